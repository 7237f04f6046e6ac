import sys, torch, tempfile, os
sys.path.insert(0, ".")
from swapserve.artifact import build_artifact, load_artifact, zoo
from swapserve.config import EngineConfig, GiB, MiB, env
from swapserve.engine import HostStore, SwapEngine
name = "resnet152"; dtype = torch.float16
z = zoo.get(name); x = tuple(t.cuda() for t in z.example(1, dtype))
d = tempfile.mkdtemp(); build_artifact(z.build(dtype), z.example(1, dtype), d + "/a", name="a", max_batch=8)
art = load_artifact(d + "/a")
store = HostStore(env().shm_dir / "diag", 4 * GiB)
for det in (False, True):
    torch.backends.cudnn.deterministic = det
    for mode in ("eager", "graph"):
        e = SwapEngine(EngineConfig(device="cuda:0", pool_bytes=2 * GiB, workspace_bytes=GiB, mode=mode), store)
        e.add("a", art)
        sw = []
        for _ in range(4):
            e.evict("a"); sw.append(e.infer("a", x)[0])
        rs = [e.infer("a", x)[0] for _ in range(4)]
        same = lambda L: all(torch.equal(L[0], t) for t in L)
        print(f"det={det} {mode}: swaps equal {same(sw)}, residents equal {same(rs)}, swap==resident {torch.equal(sw[-1], rs[-1])}, maxdiff {(sw[-1].float()-rs[-1].float()).abs().max().item():.3g}", flush=True)
        e.remove("a"); e.close()
