"""Probe of the device APIs the engine relies on, with their costs: VMM map/set-access/unmap per page size,
host registration, pinned copy bandwidth by chunk size, copy nodes in a captured graph and toggling them,
capture into a private MemPool. Prints JSON (and writes $OUT/probe.json). Run once per new card or driver."""
import json, os, sys, time, ctypes, mmap
out = {}
import torch
out["torch"] = torch.__version__
out["gpu"] = torch.cuda.get_device_name(0)
out["has_raw_exec"] = hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph_exec")
import inspect
out["cudagraph_new_sig"] = str(inspect.signature(torch.cuda.CUDAGraph.__new__)) if hasattr(torch.cuda.CUDAGraph,'__new__') else None
out["graph_sig"] = str(inspect.signature(torch.cuda.graph.__init__))
out["mempool"] = hasattr(torch.cuda, "MemPool")
try:
    import cuda.bindings, importlib.metadata as md
    out["cuda_bindings"] = md.version("cuda-bindings")
    from cuda.bindings import driver as cu, runtime as cudart
except Exception as e:
    out["cuda_bindings_err"] = repr(e)
import torchvision, transformers
out["tv"] = torchvision.__version__; out["tf"] = transformers.__version__
torch.cuda.init(); dev = torch.device("cuda:0"); torch.zeros(1, device=dev)
def ck(r):
    err = r[0] if isinstance(r, tuple) else r
    if int(err) != 0: raise RuntimeError(str(err))
    return r[1:] if isinstance(r, tuple) and len(r) > 2 else (r[1] if isinstance(r, tuple) and len(r)==2 else None)
prop = cu.CUmemAllocationProp()
prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
prop.location.id = 0
gran = ck(cu.cuMemGetAllocationGranularity(prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
out["granularity"] = int(gran)
acc = cu.CUmemAccessDesc(); acc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE; acc.location.id = 0
acc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
maps = {}
for page_mb in (2, 8, 32):
    ps = page_mb << 20; n = max(4, 128 // page_mb)
    hs = [ck(cu.cuMemCreate(ps, prop, 0)) for _ in range(n)]
    va = ck(cu.cuMemAddressReserve(ps * n, 0, 0, 0))
    t = time.perf_counter()
    for i, h in enumerate(hs):
        ck(cu.cuMemMap(int(va) + i * ps, ps, 0, h, 0))
    t1 = time.perf_counter()
    ck(cu.cuMemSetAccess(va, ps * n, [acc], 1))
    t2 = time.perf_counter()
    for i, h in enumerate(hs):
        ck(cu.cuMemSetAccess(int(va) + i*ps, ps, [acc], 1))
    t3 = time.perf_counter()
    for i in range(n): ck(cu.cuMemUnmap(int(va) + i * ps, ps))
    t4 = time.perf_counter()
    maps[page_mb] = dict(n=n, map_us=(t1-t)/n*1e6, setaccess_whole_us=(t2-t1)*1e6, setaccess_per_page_us=(t3-t2)/n*1e6, unmap_us=(t4-t3)/n*1e6)
    # alias test: map same handle in two ranges
    va2 = ck(cu.cuMemAddressReserve(ps, 0, 0, 0))
    ck(cu.cuMemMap(int(va), ps, 0, hs[0], 0)); ck(cu.cuMemMap(int(va2), ps, 0, hs[0], 0))
    ck(cu.cuMemSetAccess(va, ps, [acc], 1)); ck(cu.cuMemSetAccess(va2, ps, [acc], 1))
    class CAI:
        def __init__(s, p, n): s.__cuda_array_interface__ = dict(shape=(n,), typestr="|u1", data=(p, False), version=3)
    a = torch.as_tensor(CAI(int(va), ps), device=dev); b = torch.as_tensor(CAI(int(va2), ps), device=dev)
    a.fill_(7); torch.cuda.synchronize(); maps[page_mb]["alias_ok"] = bool((b == 7).all().item())
    ck(cu.cuMemUnmap(int(va), ps)); ck(cu.cuMemUnmap(int(va2), ps))
    for h in hs: ck(cu.cuMemRelease(h))
out["maps"] = maps
# host register of shm + bandwidth
N = 1 << 30
fd = os.open("/dev/shm/probe", os.O_RDWR | os.O_CREAT, 0o600); os.ftruncate(fd, N)
mm = mmap.mmap(fd, N); buf = (ctypes.c_char * N).from_buffer(mm); addr = ctypes.addressof(buf)
ctypes.memset(addr, 1, N)
t = time.perf_counter(); ck(cu.cuMemHostRegister(addr, N, 0)); out["host_register_s_per_GB"] = time.perf_counter() - t
host = torch.frombuffer(buf, dtype=torch.uint8)
out["is_pinned"] = bool(host.is_pinned())
d = torch.empty(N, dtype=torch.uint8, device=dev)
s = torch.cuda.Stream()
bw = {}
for chunk_mb in (1, 2, 4, 8, 64):
    c = chunk_mb << 20
    for _ in range(2):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.cuda.stream(s):
            for o in range(0, N, c):
                ck(cu.cuMemcpyHtoDAsync(d.data_ptr() + o, addr + o, c, s.cuda_stream))
        s.synchronize(); dt = time.perf_counter() - t
    bw[chunk_mb] = N / dt / 1e9
out["h2d_GBps_by_chunk_mb"] = bw
# graph capture with driver memcpy + events, and node disabling
import torchvision
m = torchvision.models.resnet18().eval().to(dev)
x = torch.randn(1,3,224,224, device=dev)
g = torch.cuda.CUDAGraph(keep_graph=True) if "keep_graph" in out["cudagraph_new_sig"] else torch.cuda.CUDAGraph()
pool = torch.cuda.graph_pool_handle()
cs = torch.cuda.Stream(); evs = [torch.cuda.Event() for _ in range(4)]
with torch.no_grad():
    for _ in range(2): m(x)
    torch.cuda.synchronize()
    try:
        with torch.cuda.graph(g, pool=pool):
            cur = torch.cuda.current_stream()
            cs.wait_stream(cur)
            with torch.cuda.stream(cs):
                for i in range(4):
                    ck(cu.cuMemcpyHtoDAsync(d.data_ptr() + i*(4<<20), addr + i*(4<<20), 4<<20, cs.cuda_stream))
                    evs[i].record(cs)
            for i in range(4): cur.wait_event(evs[i])
            y = m(x)
            cur.wait_stream(cs)
        out["capture_ok"] = True
        g.replay(); torch.cuda.synchronize()
        gr = g.raw_cuda_graph()
        r = cudart.cudaGraphGetNodes(gr, 0); nn = r[2]
        r = cudart.cudaGraphGetNodes(gr, nn); nodes = r[1]
        types = {}
        memcpys = []
        for n in nodes:
            ty = ck(cudart.cudaGraphNodeGetType(n)); types[str(ty)] = types.get(str(ty), 0) + 1
            if ty == cudart.cudaGraphNodeType.cudaGraphNodeTypeMemcpy: memcpys.append(n)
        out["node_types"] = types
        if out["has_raw_exec"]:
            ge = g.raw_cuda_graph_exec()
            for n in memcpys: ck(cudart.cudaGraphNodeSetEnabled(ge, n, 0))
            d.zero_(); torch.cuda.synchronize(); g.replay(); torch.cuda.synchronize()
            out["disabled_copy_untouched"] = bool((d[:16<<20] == 0).all().item())
            for n in memcpys: ck(cudart.cudaGraphNodeSetEnabled(ge, n, 1))
            g.replay(); torch.cuda.synchronize()
            out["enabled_copy_done"] = bool((d[:16<<20] == 1).all().item())
            p = ck(cudart.cudaGraphMemcpyNodeGetParams(memcpys[0]))
            out["memcpy_params_dst"] = str(type(p))
    except Exception as e:
        import traceback; out["capture_err"] = traceback.format_exc()[-2000:]
# torch copy_ from registered memory inside capture
try:
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2, pool=pool):
        d[:4<<20].copy_(host[:4<<20], non_blocking=True)
    out["torch_copy_capture_ok"] = True
except Exception as e:
    out["torch_copy_capture_err"] = repr(e)[:500]
# MemPool + graph capture into it
try:
    mp = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(mp):
        big = torch.empty(256 << 20, dtype=torch.uint8, device=dev); del big
    before = torch.cuda.memory_reserved()
    g3 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g3, pool=mp.id):
        y3 = m(x)
    out["mempool_capture_ok"] = True
    out["mempool_reserved_growth"] = torch.cuda.memory_reserved() - before
    out["mempool_snapshot_segments"] = len(mp.snapshot())
except Exception as e:
    import traceback; out["mempool_err"] = traceback.format_exc()[-1500:]
cu.cuMemHostUnregister(addr); os.unlink("/dev/shm/probe")
print(json.dumps(out, indent=1))
od = os.environ.get("OUT")
if od: open(os.path.join(od, "probe.json"), "w").write(json.dumps(out, indent=1))
