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

/** A model that cannot fit the memory available, refused before anything is allocated.
 *  The message starts with the model's path and gives both sizes. */
export class ModelTooLargeError extends Error {
  constructor(
    readonly file: string,
    readonly neededBytes: number,
    readonly availableBytes: number,
    detail: string,
  ) {
    super(`${file}: ${detail}`);
    this.name = "ModelTooLargeError";
  }
}
