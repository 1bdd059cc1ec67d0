/** A model file is missing, malformed, truncated or disagrees with its config.
 *  The message always starts with the offending file's path. */
export class ModelFormatError extends Error {
  constructor(
    readonly file: string,
    detail: string,
  ) {
    super(`${file}: ${detail}`);
    this.name = "ModelFormatError";
  }
}
