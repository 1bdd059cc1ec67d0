// Where the embedded default pair lives: models/ in the source tree, or beside the
// executable (src/backend/paths.ts finds the install).

import { join } from "node:path";
import { INSTALL_ROOT } from "../backend/paths";

/** The vendored trained pair (models/MODEL_CARD.md): target and draft.
 *  @example
 *  const llm = await LLM.load(DEFAULT_MODEL, { ssms: [DEFAULT_DRAFT] }); // what LLM.load() does
 */
export const DEFAULT_MODEL = join(INSTALL_ROOT, "models", "llama-shakespeare-8m");
export const DEFAULT_DRAFT = join(INSTALL_ROOT, "models", "llama-shakespeare-1.4m-draft");
