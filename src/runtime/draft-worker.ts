// Worker entry of RemoteDrafters: loads the SSMs on a backend context of its own and
// drafts, accepts and measures as the engine asks. A reply goes out on the port and
// then bumps the shared flag the engine waits on.

import { parentPort, workerData, type MessagePort } from "node:worker_threads";
import { createBackend, type Backend } from "../backend/index";
import type { CausalLM } from "../model/causal-lm";
import { loadModel } from "../model/registry";
import { LocalDrafters } from "../speculation/drafters";
import { Rng } from "../speculation/rng";
import { SSMDrafter } from "../speculation/ssm";
import { summedCurve } from "./measure";
import type { DraftWorkerSetup, FromDrafter, ToDrafter } from "./remote-drafters";

const { port, flag } = workerData as { port: MessagePort; flag: Int32Array };

let backend: Backend | null = null;
let models: CausalLM[] = [];
let drafters: LocalDrafters | null = null;
/** A posted message that failed: reported with the next reply. */
let failure: string | null = null;

function reply(msg: FromDrafter): void {
  if (failure !== null) {
    msg = { error: failure };
    failure = null;
  }
  port.postMessage(msg);
  Atomics.add(flag, 0, 1);
  Atomics.notify(flag, 0);
}

async function init(setup: DraftWorkerSetup): Promise<void> {
  backend = await createBackend({ kind: setup.kind, device: setup.device, threads: setup.threads });
  models = setup.ssms.map((p) => loadModel(p, backend!, { maxBatchTokens: 512 }));
  for (const m of models) {
    if (m.config.vocabSize !== setup.vocab) throw new Error(`draft model vocabulary (${m.config.vocabSize}) differs from the LLM's (${setup.vocab})`);
  }
  drafters = new LocalDrafters(models.map((m) => new SSMDrafter(m, setup.maxSeqs, setup.maxSeqLen, setup.maxGrowth)), setup.maxGrowth);
}

function shutdown(): void {
  drafters?.closeAll();
  for (const m of models) m.close();
  backend?.close();
  drafters = null;
  models = [];
  backend = null;
}

function ready(): LocalDrafters {
  if (!drafters) throw new Error("the draft worker is not initialised");
  return drafters;
}

async function handle(msg: ToDrafter): Promise<void> {
  switch (msg.type) {
    case "init":
      try {
        await init(msg.setup);
        reply({});
      } catch (e) {
        shutdown();
        reply({ error: (e as Error).message });
      }
      return;
    case "open":
    case "close":
    case "accept":
      // Posted, not waited for: a failure is told with the next reply.
      try {
        const d = ready();
        if (msg.type === "accept") d.accept(msg.request, msg.tokens);
        else if (msg.type === "open") d.open(msg.request);
        else d.close(msg.request);
      } catch (e) {
        failure ??= (e as Error).message;
      }
      return;
    default:
      try {
        reply(answer(msg));
      } catch (e) {
        reply({ error: (e as Error).message });
      }
  }
}

function answer(msg: Exclude<ToDrafter, { type: "init" | "open" | "close" | "accept" }>): FromDrafter {
  switch (msg.type) {
    case "draft": {
      const d = ready();
      const rngs = msg.requests.map((r) => {
        const rng = new Rng(0);
        rng.state = r.rng;
        return rng;
      });
      d.start(msg.requests.map((r, i) => ({ ...r, rng: rngs[i] })));
      const { trees, ms } = d.collect();
      const committed = msg.requests.map((r) => r.tokens.length - d.catchUpTokens(r.request, r.tokens.length));
      return { trees, ms, rngs: rngs.map((r) => r.state), committed };
    }
    case "measure":
      return { points: summedCurve(models, msg.grid) };
    case "usage":
      return { blocks: ready().blocksInUse() };
    case "shutdown":
      shutdown();
      return {};
  }
}

// One message at a time, in order (init awaits the backend).
let queue = Promise.resolve();
parentPort!.on("message", (msg: ToDrafter) => {
  queue = queue.then(() => handle(msg));
});
