import { statSync } from "node:fs";
import { createBackend } from "../backend/index";
import { DTYPE_NAMES } from "../backend/backend";
import { loadModelFiles } from "../model/load";
import { loadTokenizer } from "../tokenizer/index";
import { parse, UsageError } from "./args";

export const INFO_HELP = `specinfer info PATH [--json]

Describes a model (HF directory or .gguf file): architecture, parameter count, tensor
dtypes, tokenizer, context length and file sizes. Reads headers only.
`;

export async function infoCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parse(argv, { json: { type: "boolean" } }, true);
  if (values.help) return void process.stdout.write(INFO_HELP);
  if (positionals.length !== 1) throw new UsageError("info takes exactly one PATH (see specinfer info --help)");
  const backend = await createBackend({ threads: 1 });
  const files = loadModelFiles(positionals[0], (p) => backend.mapFile(p), { checkMemory: false }); // headers only
  try {
    const c = files.config;
    let parameters = 0;
    const dtypes: Record<string, number> = {};
    for (const t of files.tensors.values()) {
      const count = t.shape.reduce((a, b) => a * b, 1);
      parameters += count;
      const name = DTYPE_NAMES[t.dtype];
      dtypes[name] = (dtypes[name] ?? 0) + count;
    }
    const tok = loadTokenizer({ path: positionals[0], ggufMetadata: files.gguf?.metadata });
    const info = {
      path: files.path,
      format: files.format,
      architecture: c.arch,
      parameters,
      parametersByDtype: dtypes,
      layers: c.numLayers,
      hiddenSize: c.hiddenSize,
      intermediateSize: c.intermediateSize,
      heads: c.numHeads,
      kvHeads: c.numKvHeads,
      headDim: c.headDim,
      vocabSize: c.vocabSize,
      contextLength: c.maxPositionEmbeddings,
      ropeTheta: c.ropeTheta,
      ropeScaling: c.ropeScaling?.type ?? null,
      tiedEmbeddings: c.tieWordEmbeddings,
      tokenizer: { vocabSize: tok.vocabSize, bos: tok.bosId, eos: tok.eosIds, chatTemplate: tok.chatTemplate() !== null },
      files: files.files.map((f) => ({ path: f.path, bytes: statSync(f.path).size })),
    };
    if (values.json) return void process.stdout.write(JSON.stringify(info, null, 2) + "\n");
    const mb = (b: number) => `${(b / 1e6).toFixed(1)} MB`;
    const lines = [
      `model         ${info.path} (${info.format})`,
      `architecture  ${info.architecture}: ${info.layers} layers, hidden ${info.hiddenSize}, FFN ${info.intermediateSize}, ${info.heads} heads (${info.kvHeads} KV, dim ${info.headDim})`,
      `parameters    ${(parameters / 1e6).toFixed(2)} M (${Object.entries(dtypes).map(([k, v]) => `${k} ${(v / 1e6).toFixed(2)} M`).join(", ")})`,
      `context       ${info.contextLength} tokens, RoPE theta ${info.ropeTheta}${info.ropeScaling ? `, scaling ${info.ropeScaling}` : ""}`,
      `tokenizer     vocab ${tok.vocabSize}, BOS ${tok.bosId}, EOS ${tok.eosIds.join(",")}, chat template ${info.tokenizer.chatTemplate ? "yes" : "no (plain fallback)"}`,
      ...info.files.map((f) => `file          ${f.path} ${mb(f.bytes)}`),
    ];
    process.stdout.write(lines.join("\n") + "\n");
  } finally {
    files.close();
    backend.close();
  }
}
