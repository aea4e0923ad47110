"""`[segment]` on the demo: mask IoU and Dice per region on the demo's test split, against its priors in the same run.

The demo phantoms know every region they draw (`retrieval.data.phantom`, the manifest's `masks` column), so the
segmentation head (`generation/heads/segment_head.py`) is fitted on the train + val rows' masks and scored on the test
rows, at the images' full size. Arms, per region (findings: only the test rows that hold the finding, since the task
asks where a named region is):
- the segment head on the frozen `cxr-small` tower's tokens (7x7 at 224 px), every token and 3x3-pooled;
- with `--decoder`, the alternative the head was chosen over: a small trainable torch decoder on the same 7x7
  feature map (1x1 conv to 128, two upsample + 3x3 conv stages to 32x32, one logit map per region, BCE on the
  rows holding each region, Adam), cut as the head's maps are;
- the box head's `[ground]` answer (`generation/heads/box_head.py`, fitted on the same rows' boxes) filled as a mask;
- the mean training mask per region (image-free), cut as the head's maps are;
- masks shuffled between test images (another test image's mask of the same region);
- the true box filled as a mask: what the best possible box answer scores.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/segment_demo.py --limit 700 --decoder 30

(one thread: on a shared 2-core machine, torch's and BLAS's default threads made the fits 5-20x slower in wall time)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import markdown_table, write_results  # noqa: E402

ARMS = ("head 7x7", "head 3x3", "box head", "mean mask", "shuffled", "true box")


class Decoder:
    """The trainable alternative (`--decoder`): a small conv decoder from the (B, 1280, 7, 7) feature map to one
    32x32 logit map per region, trained with BCE on the rows that hold each region."""

    def __init__(self, names: list[str], dim: int, epochs: int = 40, seed: int = 0):
        import torch
        from torch import nn

        torch.manual_seed(seed)
        self.names, self.epochs = names, epochs
        self.net = nn.Sequential(
            nn.Conv2d(dim, 128, 1), nn.GELU(), nn.Upsample(size=16, mode="bilinear"), nn.Conv2d(128, 64, 3, padding=1),
            nn.GELU(), nn.Upsample(size=32, mode="bilinear"), nn.Conv2d(64, len(names), 3, padding=1),
        )  # fmt: skip

    @staticmethod
    def grid(tokens):
        b, n, d = tokens.shape
        g = int(round(n**0.5))
        return tokens.float().reshape(b, g, g, d).permute(0, 3, 1, 2)

    def fit(self, tokens, maps, held) -> Decoder:
        """tokens (N, n, d); maps (N, R, 32, 32) targets; held (N, R) which rows hold each region."""
        import torch

        x, y, w = self.grid(tokens), torch.as_tensor(maps), torch.as_tensor(held, dtype=torch.float32)
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-3, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(0)
        for _ in range(self.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(32):
                logits = self.net(x[idx])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx], reduction="none")
                loss = (loss.mean((2, 3)) * w[idx]).sum() / w[idx].sum().clamp(min=1)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self

    def segment(self, tokens, region: str, size) -> list:
        import torch

        from generation.heads.segment_head import masks_from_maps
        from retrieval.data.region_masks import resize_mask

        with torch.no_grad():
            maps = torch.sigmoid(self.net(self.grid(tokens)))[:, self.names.index(region)].numpy()
        return list(masks_from_maps(resize_mask(maps, size)))


def _box_mask(boxes: list[dict], h: int, w: int) -> np.ndarray:
    """Boxes (normalised) filled into one bool mask, pixel centres inside a box."""
    out = np.zeros((h, w), dtype=bool)
    cols, rows = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h
    for b in boxes:
        out |= ((rows >= b["y1"]) & (rows <= b["y2"]))[:, None] & ((cols >= b["x1"]) & (cols <= b["x2"]))[None, :]
    return out


def _load(args: argparse.Namespace):
    """The corpus, each row's masks and boxes, the frozen tower's tokens of every readable row."""
    from generation.data.features import visual_tokens_for_rows
    from retrieval.data.demo import build_demo_corpus
    from retrieval.data.region_masks import masks_from_json
    from retrieval.models import load_model

    work = Path(args.work)
    df = build_demo_corpus(work / "corpus", size=args.size, seed=0, limit=args.limit, workers=2, show_progress=False)
    model = load_model("cxr-small")
    model.eval().requires_grad_(False)
    t0 = time.perf_counter()
    visual, bad = visual_tokens_for_rows(df, range(len(df)), [model], None, progress=False, cache_dir=work / "tokens")
    seconds = time.perf_counter() - t0
    masks = {r: masks_from_json(df.iloc[r]["masks"]) for r in visual}
    return df, visual, masks, {"token_seconds": round(seconds, 1), "bad_rows": len(bad)}


def _fit_decoder(visual, masks, train: list[int], names: list[str], epochs: int) -> Decoder:
    import torch

    from retrieval.data.region_masks import resize_mask

    maps = np.zeros((len(train), len(names), 32, 32), np.float32)
    held = np.zeros((len(train), len(names)), np.float32)
    for i, r in enumerate(train):
        for j, name in enumerate(names):
            if name in masks[r]:
                maps[i, j], held[i, j] = resize_mask(masks[r][name], 32), 1.0
    tokens = torch.stack([visual[r].float() for r in train])
    return Decoder(names, tokens.shape[-1], epochs).fit(tokens, maps, held)


def _fit(df, visual, masks, train: list[int], lam: float, decoder_epochs: int = 0) -> dict:
    """The heads fitted on the training rows: the segment head at two poolings, the box head and, with
    `decoder_epochs`, the trainable decoder."""
    from generation.heads.box_head import fit_box_head, pooled_features
    from generation.heads.segment_head import fit_for_rows
    from retrieval.labels import ANATOMY_PREFIX

    out = {}
    for name, pool in (("head 7x7", 7), ("head 3x3", 3)):
        t0 = time.perf_counter()
        out[name] = fit_for_rows({r: visual[r] for r in train}, {r: masks[r] for r in train}, pool=pool, lam=lam)
        out[f"{name} fit_s"] = round(time.perf_counter() - t0, 2)
    boxes = [list(df.iloc[r]["boxes"]) for r in train]
    names = {b["label"] for bs in boxes for b in bs if b["label"].startswith(ANATOMY_PREFIX)}
    out["box head"] = fit_box_head(pooled_features(visual, train), boxes, names)
    if decoder_epochs:
        t0 = time.perf_counter()
        out["decoder"] = _fit_decoder(visual, masks, train, out["head 7x7"].names, decoder_epochs)
        out["decoder fit_s"] = round(time.perf_counter() - t0, 2)
    return out


def _answers(df, visual, masks, heads, train, test, region, rng) -> dict[str, list[np.ndarray]]:
    """Each arm's masks for the test rows holding `region`, in row order."""
    import torch

    from generation.heads.box_head import pooled_features
    from generation.heads.segment_head import masks_from_maps
    from retrieval.data.region_masks import resize_mask

    rows = [r for r in test if region in masks[r]]
    h, w = masks[rows[0]][region].shape
    toks = torch.stack([visual[r].float() for r in rows])
    out = {}
    for name in ("head 7x7", "head 3x3"):
        out[name] = list(heads[name].segment(heads[name].features(toks), region, (h, w)))
    if "decoder" in heads:
        out["decoder"] = heads["decoder"].segment(toks, region, (h, w))
    grounded = heads["box head"].ground(pooled_features(visual, rows), [region] * len(rows))
    out["box head"] = [_box_mask(bs or [], h, w) for bs in grounded]
    held = [masks[r][region] for r in train if region in masks[r]]
    mean = masks_from_maps(resize_mask(np.mean(held, axis=0), (h, w))[None])[0]
    out["mean mask"] = [mean] * len(rows)
    n = len(rows)  # another test image's mask, never the image's own
    out["shuffled"] = [masks[rows[(i + 1 + int(rng.integers(n - 1))) % n]][region] for i in range(n)]
    true_boxes = [[b for b in df.iloc[r]["boxes"] if b["label"] == region] for r in rows]
    out["true box"] = [_box_mask(bs, h, w) for bs in true_boxes]
    return {"rows": rows, **out}


def _score(
    df, visual, masks, heads, train, test, min_test: int, arms: list[str]
) -> tuple[list[dict], list[dict], dict]:
    """Per region: every arm's mean IoU and Dice on the test rows holding it; then the means over anatomy and
    over findings."""
    from retrieval.data.region_masks import dice, iou

    rng = np.random.default_rng(0)
    table, per_region = [], {}
    for region in [n for n in heads["head 7x7"].names if sum(n in masks[r] for r in test) >= min_test]:
        ans = _answers(df, visual, masks, heads, train, test, region, rng)
        truth = [masks[r][region] for r in ans["rows"]]
        per_region[region] = {
            a: {
                "iou": float(np.mean([iou(p, t) for p, t in zip(ans[a], truth, strict=True)])),
                "dice": float(np.mean([dice(p, t) for p, t in zip(ans[a], truth, strict=True)])),
            }
            for a in arms
        }
        row = {"region": region, "test rows": len(truth), "train rows": sum(region in masks[r] for r in train)}
        row.update({f"IoU {a}": per_region[region][a]["iou"] for a in arms})
        row.update({f"Dice {a}": per_region[region][a]["dice"] for a in arms})
        table.append(row)
    means = []
    for kind, anatomy in (("anatomy", True), ("findings", False)):
        sel = [r for r in table if r["region"].startswith("anatomy:") == anatomy]
        if sel:
            cols = [c for c in sel[0] if c.startswith(("IoU", "Dice"))]
            means.append(
                {"region": f"mean over {kind} ({len(sel)})", **{c: float(np.mean([r[c] for r in sel])) for c in cols}}
            )
    return table, means, per_region


def _verdict(table: list[dict], arms: list[str]) -> list[str]:
    """Where the head (7x7) wins and where it loses, by IoU: against the priors and the box head, then against every
    other answer too (the decoder). Its own 3x3 ablation and `true box` (it reads the test truth: the ceiling of a
    box answer, not a baseline) are left out."""
    lines = ["## Where the head wins and loses (IoU of head 7x7 against the best other arm)", ""]
    groups = [("the priors and the box head", ["box head", "mean mask", "shuffled"])]
    if "decoder" in arms:
        groups.append(("those and the trainable decoder", ["decoder", "box head", "mean mask", "shuffled"]))
    for title, rivals in groups:
        wins, losses = [], []
        for r in table:
            best = max(rivals, key=lambda a: r[f"IoU {a}"])
            ours, theirs = r["IoU head 7x7"], r[f"IoU {best}"]
            (wins if ours > theirs else losses).append(f"{r['region']} ({ours:.3f} vs {best} {theirs:.3f})")
        lines += [
            f"Against {title}:",
            "",
            f"- wins on {len(wins)}: " + ("; ".join(wins) or "none"),
            f"- loses or ties on {len(losses)}: " + ("; ".join(losses) or "none"),
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/segment_demo")
    ap.add_argument("--limit", type=int, default=800, help="IU reports rendered (80/10/10 split by patient)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--min-test", type=int, default=4, help="report a region held by at least this many test rows")
    ap.add_argument("--decoder", type=int, default=0, metavar="EPOCHS", help="also train the torch decoder arm")
    ap.add_argument("--out", default="segment_demo")
    args = ap.parse_args(argv)
    arms = [*ARMS[:2], "decoder", *ARMS[2:]] if args.decoder else list(ARMS)
    df, visual, masks, info = _load(args)
    split = df["split"].astype(str).tolist()
    train = [r for r in sorted(visual) if split[r] in ("train", "val")]
    test = [r for r in sorted(visual) if split[r] == "test"]
    heads = _fit(df, visual, masks, train, args.lam, args.decoder)
    t0 = time.perf_counter()
    table, means, per_region = _score(df, visual, masks, heads, train, test, args.min_test, arms)
    score_s = time.perf_counter() - t0
    iou_cols = ["region", "test rows", "train rows"] + [f"IoU {a}" for a in arms]
    dice_cols = ["region", "test rows"] + [f"Dice {a}" for a in arms]
    payload = {
        "args": vars(args),
        "rows": {"train": len(train), "test": len(test)},
        **info,
        "fit_seconds": {k: v for k, v in heads.items() if k.endswith("fit_s")},
        "score_seconds": round(score_s, 1),
        "regions": per_region,
        "means": means,
    }
    md = [
        f"Demo corpus: {len(df)} IU reports rendered at {args.size} px; fitted on {len(train)} train+val rows, scored "
        f"on {len(test)} test rows (patient-disjoint). Tokens: frozen `cxr-small` (EfficientNet-Lite0, 224 px, 7x7 "
        f"x 1280; the token pass took {info['token_seconds']} s, near 0 when an earlier run's token cache holds "
        f"them). Ridge penalty {args.lam}. Findings are scored on the test "
        f"rows that hold them; regions held by fewer than {args.min_test} test rows are left out.",
        "",
        "## Mask IoU",
        "",
        markdown_table(table + means, iou_cols),
        "## Dice",
        "",
        markdown_table(table + means, dice_cols),
        *_verdict(table, arms),
        f"Fit seconds: {payload['fit_seconds']}; scoring every arm: {payload['score_seconds']} s.",
        "",
    ]
    write_results(
        args.out, payload, "\n".join(md), "python benchmarks/segment_demo.py " + " ".join(argv or sys.argv[1:])
    )
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
