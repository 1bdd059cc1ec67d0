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

/** A value read from a file as an error message shows it: JSON cut to 80 characters
 *  (a hostile value may be megabytes long or nested thousands deep). */
export function shown(value: unknown): string {
  let text: string;
  if (ArrayBuffer.isView(value)) text = `${value.constructor.name}(${(value as unknown as ArrayLike<unknown>).length})`;
  else if (typeof value === "bigint") text = String(value);
  else {
    try {
      text = JSON.stringify(value) ?? String(value);
    } catch {
      text = Array.isArray(value) ? "[...]" : typeof value;
    }
  }
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}
