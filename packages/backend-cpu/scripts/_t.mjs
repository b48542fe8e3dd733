import asc from 'assemblyscript/asc';
const outputs = {};
const flags = process.argv[2] ?? 'simd';
const { error, stderr } = await asc.main(['asm/kernels.ts', '-O3', '--noAssert', '--runtime', 'stub', '--use', 'abort=', '--enable', flags, '--outFile', 'out.wasm'], {
  writeFile(name, contents) { outputs[name] = contents; },
});
if (error) { console.log(stderr.toString()); process.exit(1); }
const inst = new WebAssembly.Instance(new WebAssembly.Module(outputs['out.wasm']), {});
const e = inst.exports;
e.memory.grow(200);
const base = e.heapBase() + 1024;
const F = 128, C = 256, Dv = 64;
const u = base, s = u + F * C * 4, z = s + F * Dv * 4, o = z + F * 4, den = o + C * Dv * 4, w = den + C*4, comp = w + F*4, zc = comp + F*Dv*4;
const f32 = new Float32Array(e.memory.buffer);
for (let i = u / 4; i < zc / 4 + F; i++) f32[i] = Math.random()*0.01;
for (const name of ['readout', 'moments']) {
  for (let rep = 0; rep < 16; rep++) {
    const t = performance.now();
    const iters = 200;
    for (let it = 0; it < iters; it++) {
      if (name === 'readout') e.readout(u, C, F, s, F*32, z, C / 4, Dv, o, Dv, den);
      else e.moments(u, C, F, o, C*32, C, Dv, s, comp, F*32, w, z, zc);
    }
    const dt = (performance.now() - t) / 1000;
    console.log(name, flags, ((2 * F * C * Dv * iters) / dt / 1e9).toFixed(2), 'GFLOP/s');
  }
}
