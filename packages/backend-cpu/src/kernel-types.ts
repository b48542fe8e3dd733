/** The exports of the compiled asm/kernels.ts; pointers are byte offsets into `memory`. */
export interface KernelExports {
  readonly memory: WebAssembly.Memory;
  heapBase(): number;
  features(
    src: number,
    ldSrc: number,
    n4: number,
    table: number,
    f0: number,
    f1: number,
    out: number,
    ldOut: number,
  ): void;
  moments(
    u: number,
    ldU: number,
    nf: number,
    v: number,
    vPanel: number,
    nTok: number,
    nc: number,
    s: number,
    comp: number,
    sPanel: number,
    w: number,
    z: number,
    zComp: number,
    /** 0: every token counts 1 in z; else one weight per token (asm/kernels.ts). */
    tokenWeights: number,
  ): void;
  readout(
    u: number,
    ldU: number,
    nf: number,
    s: number,
    sPanel: number,
    z: number,
    nq4: number,
    nc: number,
    o: number,
    ldO: number,
    den: number,
  ): void;
  scores(
    x: number,
    ldX: number,
    nq4: number,
    y: number,
    ldY: number,
    nk8: number,
    d: number,
    w: number,
    ldW: number,
    limits: number,
    bounded: number,
  ): void;
  polynomial(
    w: number,
    ldW: number,
    nq: number,
    nk8: number,
    limits: number,
    coefficients: number,
    order: number,
    bounded: number,
  ): void;
  weighted(
    w: number,
    ldW: number,
    nq4: number,
    nk: number,
    v: number,
    vPanel: number,
    nc: number,
    o: number,
    ldO: number,
    /** 0: no row sums. */
    den: number,
    limits: number,
    bounded: number,
  ): void;
  /** Returns the rows whose norm is not finite (a NaN or an infinity in the row, or overflow). */
  centerRows(src: number, n: number, d: number, centered: number, norms: number): number;
  transposeScaled(
    src: number,
    n: number,
    d: number,
    factors: number,
    dst: number,
    ldDst: number,
    nPad: number,
  ): void;
  packPanels(
    src: number,
    n: number,
    dv: number,
    c0: number,
    c1: number,
    nc: number,
    dst: number,
    panelFloats: number,
  ): number;
  normalizeRows(o: number, ldO: number, den: number, rows: number, width: number, dst: number): number;
  /** a[i] += b[i] for i < 4·n4. */
  addVectors(a: number, b: number, n4: number): void;
}

/** The backward pass's extra kernels. */
export interface BackwardKernelExports extends KernelExports {
  projectBlocks(
    s: number,
    sPanel: number,
    nf: number,
    nc: number,
    g: number,
    blockBytes: number,
    n8: number,
    h: number,
    ldH: number,
    /** 0: none; else one value per feature added to its row of H. */
    bias: number,
  ): void;
  featureGradient(
    h: number,
    ldH: number,
    table: number,
    f0: number,
    f1: number,
    src: number,
    ldSrc: number,
    n4: number,
    out: number,
  ): void;
  featureGradientConstant(
    weights: number,
    table: number,
    f0: number,
    f1: number,
    src: number,
    ldSrc: number,
    n4: number,
    out: number,
  ): void;
  dotFeatures(u: number, ldU: number, h: number, ldH: number, nf: number, n4: number, out: number): void;
  hadamard(a: number, b: number, n4: number): void;
  transpose(src: number, ldSrc: number, rows: number, cols: number, dst: number, ldDst: number): void;
  weightedTransposed(
    w: number,
    ldW: number,
    nq: number,
    nk4: number,
    x: number,
    xPanel: number,
    nc: number,
    o: number,
    ldO: number,
    limits: number,
    bounded: number,
  ): void;
}
