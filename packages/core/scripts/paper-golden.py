#!/usr/bin/env python3
"""Golden values for test/paper-port.test.ts, from the FAST paper authors' formulas.

The authors' reference implementation is the PyTorch/einops autograd Function in
github.com/armingerami/reproducing_fastmax_results, attention_mechanisms/fastattention_einops.py
(commit 6987e7c7d009167ee9fb82325c3e52fdb942e359). PyTorch is not needed here: this script restates
the same factorized formulas (numerator F, denominator g, their `normalize` helper and their
hand-derived gradients) in numpy float64, with the same einsum subscripts, so the JSON it writes is
what their code computes up to float64 rounding. It also checks their analytic gradients against
central finite differences of their own forward pass and stores the error it saw.

Their conventions: q, k, v are [B, H, N, D] (no GQA, N = M, Dv = D); f(s) = 1 + s (+ s^2/2 for
p = 2); s = q.k / t with t = normalize_term * sqrt(D) (normalize_term defaults to 8), or t = 1 when
the tensors were normalized first (`tensors_normalized=True`) by `normalize`, which centers each token
and divides every token of a head by the largest token norm of that head. mask=True is causal
(key j <= query i) on top of that sequence-wide normalization.

Usage: python3 packages/core/scripts/paper-golden.py   (writes packages/core/test/fixtures/paper-golden.json)
"""

import json
import math
import pathlib
import re

import numpy as np

es = np.einsum


def cumulative(x):
    """Prefix sums over the sequence axis (their torch.cumsum(x, 2))."""
    return np.cumsum(x, axis=2)


def reverse_cumulative(x):
    """Suffix sums over the sequence axis (their flip / cumsum / flip)."""
    return np.flip(np.cumsum(np.flip(x, axis=2), axis=2), axis=2)


# ---- forward: numerator F and denominator g ---------------------------------------------------


def numerator(q, k, v, t, p, causal):
    if causal:
        total = cumulative(v)
        total = total + es("bhim,bhimj->bhij", q, cumulative(es("bhnm,bhnj->bhnmj", k, v))) / t
        if p == 2:
            moments = cumulative(es("bhnm,bhnl,bhnj->bhnmlj", k, k, v))
            total = total + es("bhim,bhil,bhimlj->bhij", q, q, moments) / (2 * t**2)
        return total
    n = q.shape[2]
    total = np.repeat(v.sum(axis=2)[:, :, None, :], n, axis=2)
    total = total + es("bhim,bhmj->bhij", q, es("bhnm,bhnj->bhmj", k, v)) / t
    if p == 2:
        moments = es("bhnm,bhnl,bhnj->bhmlj", k, k, v)
        total = total + es("bhim,bhil,bhmlj->bhij", q, q, moments) / (2 * t**2)
    return total


def denominator(q, k, t, p, causal):
    b, h, n, _ = q.shape
    if causal:
        total = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), (b, h, n)).copy()
        total = total + es("bhim,bhim->bhi", q, cumulative(k)) / t
        if p == 2:
            moments = cumulative(es("bhnm,bhnl->bhnml", k, k))
            total = total + es("bhim,bhil,bhiml->bhi", q, q, moments) / (2 * t**2)
        return total
    total = np.full((b, h, n), float(n))
    total = total + es("bhil,bhl->bhi", q, k.sum(axis=2)) / t
    if p == 2:
        moments = es("bhml,bhmp->bhlp", k, k)
        total = total + es("bhil,bhip,bhlp->bhi", q, q, moments) / (2 * t**2)
    return total


def forward(q, k, v, t, p, causal):
    g = denominator(q, k, t, p, causal)
    return numerator(q, k, v, t, p, causal) / g[..., None], g


def forward_direct(q, k, v, t, p, causal):
    """Their unfactorized path (compute_attn): the score matrix, f, row sums. Used as a cross-check."""
    s = es("bhid,bhjd->bhij", q, k) / t
    f = 1 + s + (s**2 / 2 if p == 2 else 0)
    if causal:
        f = np.tril(f)
    a = f / f.sum(axis=3, keepdims=True)
    return es("bhin,bhnj->bhij", a, v)


def normalize(q, k):
    """Their `normalize`: center every token, divide a head by its largest centered token norm."""
    q = q - q.mean(axis=3, keepdims=True)
    k = k - k.mean(axis=3, keepdims=True)
    q_norm = np.sqrt(es("bhnd,bhnd->bhn", q, q))
    k_norm = np.sqrt(es("bhnd,bhnd->bhn", k, k))
    return q / q_norm.max(axis=2)[:, :, None, None], k / k_norm.max(axis=2)[:, :, None, None]


# ---- their analytic backward ------------------------------------------------------------------


def grad_q(q, k, v, o, g, do, t, p, causal):
    if causal:
        z1 = es("bhpj,bhpjr->bhpr", do, cumulative(es("bhlj,bhlr->bhljr", v, k)))
        z2 = es("bhpj,bhpj,bhpr->bhpr", do, o, cumulative(k))
    else:
        z1 = es("bhpl,bhlr->bhpr", es("bhpj,bhlj->bhpl", do, v), k)
        z2 = es("bhp,bhr->bhpr", es("bhpj,bhpj->bhp", do, o), k.sum(axis=2))
    if p == 1:
        return (z1 - z2) / (t * g[..., None])
    if causal:
        z3 = es("bhpm,bhpj,bhpmjr->bhpr", q, do, cumulative(es("bhlm,bhlj,bhlr->bhlmjr", k, v, k))) / t
        z4 = es("bhpm,bhpj,bhpj,bhprm->bhpr", q, do, o, cumulative(es("bhlr,bhlm->bhlrm", k, k))) / t
    else:
        y3 = es("bhlm,bhlr,bhlp->bhmrp", k, k, es("bhlj,bhpj->bhlp", v, do))
        z3 = es("bhpm,bhmrp->bhpr", q, y3) / t
        y4 = es("bhpm,bhmr->bhpr", q, es("bhlm,bhlr->bhmr", k, k))
        z4 = es("bhpj,bhpj,bhpr->bhpr", o, do, y4) / t
    return (z1 - z2 + z3 - z4) / (t * g[..., None])


def grad_k(q, k, v, o, g, do, t, p, causal):
    inv = 1 / g
    n = q.shape[2]
    if causal:
        z1 = es("bhpj,bhpjr->bhpr", v, reverse_cumulative(es("bhi,bhij,bhir->bhijr", inv, do, q)))
        z2 = reverse_cumulative(es("bhi,bhij,bhij,bhir->bhijr", inv, do, o, q)).sum(axis=3)
    else:
        z1 = es("bhpj,bhjr->bhpr", v, es("bhi,bhij,bhir->bhjr", inv, do, q))
        z2 = es("bhi,bhir,bhi->bhr", inv, q, es("bhij,bhij->bhi", do, o))
        z2 = np.repeat(z2[:, :, None, :], n, axis=2)
    if p == 1:
        return (z1 - z2) / t
    if causal:
        y3 = reverse_cumulative(es("bhi,bhij,bhim,bhir->bhijmr", inv, do, q, q))
        z3 = es("bhpm,bhpj,bhpjmr->bhpr", k, v, y3) / t
        y4 = reverse_cumulative(es("bhi,bhij,bhim,bhij,bhir->bhijmr", inv, do, q, o, q))
        z4 = es("bhpm,bhpjmr->bhpr", k, y4) / t
    else:
        y3 = es("bhi,bhij,bhim,bhir->bhjmr", inv, do, q, q)
        z3 = es("bhpm,bhpj,bhjmr->bhpr", k, v, y3) / t
        y4 = es("bhij,bhij,bhir->bhir", do, o, q)
        z4 = es("bhpm,bhi,bhim,bhir->bhpr", k, inv, q, y4) / t
    return (z1 - z2 + z3 - z4) / t


def grad_v(q, k, g, do, t, p, causal):
    inv = 1 / g
    n = q.shape[2]
    if causal:
        z1 = reverse_cumulative(es("bhir,bhi->bhir", do, inv))
        z2 = es("bhpm,bhprm->bhpr", k, reverse_cumulative(es("bhir,bhim,bhi->bhirm", do, q, inv))) / t
    else:
        z1 = np.repeat(es("bhi,bhir->bhr", inv, do)[:, :, None, :], n, axis=2)
        z2 = es("bhpm,bhrm->bhpr", k, es("bhi,bhir,bhim->bhrm", inv, do, q)) / t
    if p == 1:
        return z1 + z2
    if causal:
        y3 = reverse_cumulative(es("bhir,bhi,bhim,bhil->bhirml", do, inv, q, q))
        z3 = es("bhpm,bhpl,bhprml->bhpr", k, k, y3) / (2 * t**2)
    else:
        y3 = es("bhi,bhir,bhim,bhil->bhrml", inv, do, q, q)
        z3 = es("bhpm,bhpl,bhrml->bhpr", k, k, y3) / (2 * t**2)
    return z1 + z2 + z3


def backward(q, k, v, do, t, p, causal):
    o, g = forward(q, k, v, t, p, causal)
    return (
        grad_q(q, k, v, o, g, do, t, p, causal),
        grad_k(q, k, v, o, g, do, t, p, causal),
        grad_v(q, k, g, do, t, p, causal),
    )


def normalize_backward(x, dxn):
    """What autograd does through `normalize` for one of q, k: x_n = c / max_n |c_n|, c = x - mean."""
    c = x - x.mean(axis=3, keepdims=True)
    norms = np.sqrt((c * c).sum(axis=3))
    top = norms.argmax(axis=2)
    dc = np.empty_like(c)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            m = norms[b, h, top[b, h]]
            dc[b, h] = dxn[b, h] / m
            d_m = -(dxn[b, h] * c[b, h]).sum() / m**2
            dc[b, h, top[b, h]] += d_m * c[b, h, top[b, h]] / m
    return dc - dc.mean(axis=3, keepdims=True)


def finite_difference_error(q, k, v, do, t, p, causal):
    """max |analytic - numeric| / max |numeric| of their backward against their own forward."""
    analytic = backward(q, k, v, do, t, p, causal)
    # Five-point stencil: truncation ~ h^4/30 * L^(5) ~ 1e-13 and rounding ~ eps*|L|/h ~ 1e-12 at h = 1e-3.
    step = 1e-3
    worst = 0.0
    inputs = [q.copy(), k.copy(), v.copy()]

    def loss_at(tensor, index, value):
        tensor[index] = value
        return (forward(*inputs, t, p, causal)[0] * do).sum()

    for which, tensor in enumerate(inputs):
        numeric = np.zeros_like(tensor)
        for index in np.ndindex(tensor.shape):
            x = tensor[index]
            numeric[index] = (
                -loss_at(tensor, index, x + 2 * step)
                + 8 * loss_at(tensor, index, x + step)
                - 8 * loss_at(tensor, index, x - step)
                + loss_at(tensor, index, x - 2 * step)
            ) / (12 * step)
            tensor[index] = x
        worst = max(worst, np.abs(analytic[which] - numeric).max() / max(1.0, np.abs(numeric).max()))
    return worst


def float32_values(rng, shape):
    """Normal samples rounded to float32, since the TypeScript API takes Float32Array inputs."""
    return rng.standard_normal(shape).astype(np.float32).astype(np.float64)


def flat(x):
    return [float(value) for value in np.ascontiguousarray(x).reshape(-1)]


def main():
    shapes = [(1, 2, 5, 3), (2, 2, 7, 4), (1, 2, 9, 4), (2, 2, 6, 3)]
    cases = []
    worst_fd = 0.0
    index = 0
    for normalization in ("scale", "max-norm"):
        for p in (1, 2):
            for causal in (False, True):
                b, h, n, d = shapes[index % len(shapes)]
                rng = np.random.default_rng(20240 + index)
                index += 1
                q = float32_values(rng, (b, h, n, d))
                k = float32_values(rng, (b, h, n, d))
                v = float32_values(rng, (b, h, n, d))
                do = float32_values(rng, (b, h, n, d))
                case = {
                    "name": f"{normalization}, p={p}, {'causal' if causal else 'non-causal'}, B={b} H={h} N={n} D={d}",
                    "normalization": normalization,
                    "order": p,
                    "causal": causal,
                    "shape": [b, h, n, d],
                    "q": flat(q),
                    "k": flat(k),
                    "v": flat(v),
                    "dOut": flat(do),
                }
                if normalization == "scale":
                    t = 8 * math.sqrt(d)
                    o, _ = forward(q, k, v, t, p, causal)
                    assert np.abs(o - forward_direct(q, k, v, t, p, causal)).max() < 1e-13
                    dq, dk, dv = backward(q, k, v, do, t, p, causal)
                    fd = finite_difference_error(q, k, v, do, t, p, causal)
                    case.update(normalizeTerm=t, output=flat(o), dq=flat(dq), dk=flat(dk), dv=flat(dv))
                else:
                    qn, kn = normalize(q, k)
                    o, _ = forward(qn, kn, v, 1.0, p, causal)
                    assert np.abs(o - forward_direct(qn, kn, v, 1.0, p, causal)).max() < 1e-13
                    dqn, dkn, dv = backward(qn, kn, v, do, 1.0, p, causal)
                    # Their gradient w.r.t. the normalized tensors, at those tensors rounded to float32
                    # so that the TypeScript side can feed exactly the same point.
                    qn32 = qn.astype(np.float32).astype(np.float64)
                    kn32 = kn.astype(np.float32).astype(np.float64)
                    o32, _ = forward(qn32, kn32, v, 1.0, p, causal)
                    dqn32, dkn32, dv32 = backward(qn32, kn32, v, do, 1.0, p, causal)
                    fd = finite_difference_error(qn, kn, v, do, 1.0, p, causal)
                    case.update(
                        normalizeTerm=1.0,
                        output=flat(o),
                        # The full chain q -> normalize -> fastmax, with `normalize` differentiated by hand.
                        dq=flat(normalize_backward(q, dqn)),
                        dk=flat(normalize_backward(k, dkn)),
                        dv=flat(dv),
                        normalized={
                            "q": flat(qn32),
                            "k": flat(kn32),
                            "output": flat(o32),
                            "dq": flat(dqn32),
                            "dk": flat(dkn32),
                            "dv": flat(dv32),
                        },
                    )
                case["finiteDifferenceError"] = fd
                worst_fd = max(worst_fd, fd)
                cases.append(case)
                print(f"{case['name']}: their backward vs finite differences {fd:.2e}")

    out = {
        "generator": "packages/core/scripts/paper-golden.py",
        "source": "armingerami/reproducing_fastmax_results attention_mechanisms/fastattention_einops.py "
        "@ 6987e7c7d009167ee9fb82325c3e52fdb942e359",
        "numpy": np.__version__,
        "worstFiniteDifferenceError": worst_fd,
        "cases": cases,
    }
    target = pathlib.Path(__file__).resolve().parent.parent / "test" / "fixtures" / "paper-golden.json"
    text = json.dumps(out, indent=2)
    # Biome's JSON formatter writes exponents without padding (6.8e-5, not 6.8e-05); match it so the
    # committed file passes `biome check` as generated.
    text = re.sub(r"(\d)e([+-]?)0*(\d)", lambda m: m[1] + "e" + ("-" if m[2] == "-" else "") + m[3], text)
    target.write_text(text + "\n")
    print(f"wrote {target} ({len(cases)} cases); worst finite-difference error {worst_fd:.2e}")


if __name__ == "__main__":
    main()
