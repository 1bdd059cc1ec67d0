// Turns a request's token stream into text: streaming-safe decoding (no half UTF-8
// characters) and stop strings (text is held back while it could still be the start
// of one, and the request is cut before the first match).

import type { Tokenizer } from "../tokenizer/tokenizer";

export interface TextUpdate {
  /** Text that is final and may be shown now. */
  text: string;
  /** Set when a stop string matched: how many of the pushed tokens to keep. */
  keepTokens?: number;
}

export class TextStream {
  private readonly decoder;
  private readonly longestStop: number;
  /** All generated text so far, and how much of it has been handed out. */
  private all = "";
  private emitted = 0;
  /** Text length after each generated token, to cut tokens at a stop string. */
  private readonly ends: number[] = [];
  stopped = false;

  constructor(tokenizer: Tokenizer, prompt: readonly number[], private readonly stops: string[]) {
    this.decoder = tokenizer.createStreamDecoder({ prefix: prompt });
    this.longestStop = Math.max(0, ...stops.map((s) => s.length));
  }

  get text(): string {
    return this.all;
  }

  push(tokens: readonly number[]): TextUpdate {
    const before = this.ends.length;
    for (const t of tokens) {
      this.all += this.decoder.push(t);
      this.ends.push(this.all.length);
    }
    const hit = this.findStop(Math.max(0, this.emitted - this.longestStop));
    if (hit >= 0) {
      this.stopped = true;
      this.all = this.all.slice(0, hit);
      // Keep the tokens whose text ends before the stop string starts.
      let keep = before;
      while (keep < this.ends.length && this.ends[keep] <= hit) keep++;
      return { text: this.take(this.all.length), keepTokens: keep - before };
    }
    // Hold back a tail that could still grow into a stop string.
    return { text: this.take(Math.max(this.emitted, this.all.length - Math.max(0, this.longestStop - 1))) };
  }

  /** The rest of the text once the request is over. */
  finish(): string {
    if (!this.stopped) {
      this.all += this.decoder.flush();
      const hit = this.findStop(Math.max(0, this.emitted - this.longestStop));
      if (hit >= 0) this.all = this.all.slice(0, hit);
    }
    return this.take(this.all.length);
  }

  private findStop(from: number): number {
    let best = -1;
    for (const s of this.stops) {
      const i = this.all.indexOf(s, from);
      if (i >= 0 && (best < 0 || i < best)) best = i;
    }
    return best;
  }

  private take(upTo: number): string {
    const out = this.all.slice(this.emitted, upTo);
    this.emitted = Math.max(this.emitted, upTo);
    return out;
  }
}
