"""`clusterlm cluster`: show a cluster spec as a tree, merge node specs, list the presets. Torch-free.

    clusterlm cluster show h100-sxm-8x                 # a bundled preset, as a tree
    clusterlm cluster show node.toml                   # what `clusterlm probe --out node.toml` wrote
    clusterlm cluster merge n1.toml n2.toml --out cluster.toml   # probe outputs of several nodes
    clusterlm cluster presets
"""

from __future__ import annotations

import argparse
from typing import Any

from clusterlm.cluster import hardware
from clusterlm.cluster.spec import (ClusterSpec, DeviceSpec, LinkSpec, load_spec, merge_specs, presets,
                                    save_spec)


# ---- rendering ------------------------------------------------------------------------------------------
def _tree(label: str, children: list[Any], prefix: str = "", last: bool = True, root: bool = True) -> list[str]:
    """children: strings or (label, children) pairs. ASCII, so it survives any terminal and pipe."""
    lines = [label] if root else [prefix + ("`-- " if last else "|-- ") + label]
    inner = "" if root else prefix + ("    " if last else "|   ")
    for i, child in enumerate(children):
        is_last = i == len(children) - 1
        if isinstance(child, tuple):
            lines += _tree(child[0], child[1], inner, is_last, root=False)
        else:
            lines.append(inner + ("`-- " if is_last else "|-- ") + child)
    return lines


def _fmt_link(link: LinkSpec, per: str) -> str:
    s = f"{link.name}: {link.bandwidth_gbs:g} GB/s per direction per {per}"
    if link.count > 1:
        s += f" x {link.count} = {link.bandwidth_gbs * link.count:g} GB/s per node"
    s += f", ~{link.latency_us:g} us"
    if link.measured_busbw_gbs:
        s += f", measured all-reduce busbw {link.measured_busbw_gbs:g} GB/s"
    return s


def _device_children(d: DeviceSpec) -> list[Any]:
    out: list[Any] = []
    mem = f"memory: {d.memory_gib:g} GiB" + (" each" if d.count > 1 else "")
    if d.memory_bandwidth_gbs:
        mem += f", {d.memory_bandwidth_gbs:g} GB/s peak"
    if d.measured_memory_bandwidth_gbs:
        mem += f", {d.measured_memory_bandwidth_gbs:.1f} GB/s measured (copy)"
    out.append(mem)
    peaks = [(dt, *d.peak(dt)) for dt in hardware.DTYPES]
    known = [(dt, v, src) for dt, v, src in peaks if v is not None]
    if known:
        src = known[0][2]
        out.append("peak TFLOP/s (dense): " + ", ".join(f"{dt} {v:g}" for dt, v, _ in known) + f"  [{src}]")
    else:
        out.append("peak TFLOP/s: unknown (not in the hardware table; the probe's measurement is used)")
    measured = [f"{dt} {d.matmul_tflops(dt):.3g}" + (f" ({d.matmul_tflops(dt) / d.peak(dt)[0]:.0%} of peak)"
                                                     if d.peak(dt)[0] else "")
                for dt in hardware.DTYPES if d.matmul_tflops(dt)]
    out.append("measured matmul TFLOP/s: " + (", ".join(measured) if measured else "none (run clusterlm probe)"))
    if d.train_efficiency:
        out.append("training efficiency: " + ", ".join(f"{k} {v:.0%}" for k, v in d.train_efficiency.items()))
    per_op = []
    for dt, rows in d.matmul_sweep.items():
        per_op.append(f"{dt} GEMM sweep {len(rows)} shapes {min(r[3] for r in rows):.3g}-{max(r[3] for r in rows):.3g} "
                      f"TFLOP/s")
    if d.attention_sweep:
        per_op.append(f"causal attention {min(r[2] for r in d.attention_sweep):.3g}-"
                      f"{max(r[2] for r in d.attention_sweep):.3g} TFLOP/s")
    if d.kernel_sweep:
        per_op.append("kernels (ns/element, fwd+bwd) " + ", ".join(
            f"{k} {min(r[1] for r in v):.3g}-{max(r[1] for r in v):.3g}" for k, v in d.kernel_sweep.items()))
    if d.elementwise_sweep:
        per_op.append(f"elementwise {min(r[1] for r in d.elementwise_sweep):.3g}-"
                      f"{max(r[1] for r in d.elementwise_sweep):.3g} GB/s by size")
    if d.op_overhead_us is not None:
        per_op.append(f"{d.op_overhead_us:g} us per op")
    for arch, rows in d.rnn_sweep.items():
        per_op.append(f"{arch} layer {min(r[-1] for r in rows):.3g}-{max(r[-1] for r in rows):.3g} us per time step"
                      + (f" + {min(r[2] for r in rows):.3g}-{max(r[2] for r in rows):.3g} us per call"
                         if len(rows[0]) == 4 else ""))
    if d.optimizer_us_per_tensor is not None:
        per_op.append(f"optimizer {d.optimizer_us_per_tensor:g} us per parameter tensor + {d.step_fixed_us or 0:g} us "
                      f"per step")
    if d.data_us_per_batch is not None:
        per_op.append(f"data {d.data_us_per_batch:g} us per micro-batch")
    if d.log_us_per_step is not None:
        per_op.append(f"metrics record {d.log_us_per_step:g} us")
    if per_op:
        out.append("per-op figures (planner step model): " + "; ".join(per_op))
    if d.source:
        out.append(f"source: {d.source}")
    return out


def render_tree(spec: ClusterSpec) -> str:
    total_nodes = sum(n.count for n in spec.node_types)
    total_dev = sum(n.count * n.devices_per_node for n in spec.node_types)
    node_children: list[Any] = []
    for n in spec.node_types:
        kids: list[Any] = []
        c = n.cpu
        kids.append(f"cpu: {c.model}, {c.sockets} socket(s), {c.cores} cores, {c.threads} threads, "
                    f"{c.numa_nodes} NUMA node(s)" + (f"; {' '.join(c.flags)}" if c.flags else ""))
        kids.append(f"memory: {n.memory_gib:g} GiB")
        if n.device:
            d = n.device
            cc = f", compute capability {d.compute_capability}" if d.compute_capability else ""
            kids.append((f"devices: {d.count} x {d.name} ({d.kind}{cc})", _device_children(d)))
        else:
            kids.append("devices: none")
        kids.append("intra-node link: " + (_fmt_link(n.intra_link, "device") if n.intra_link else "none/unknown"))
        hosts = f" [{', '.join(n.hostnames[:4])}{', ...' if len(n.hostnames) > 4 else ''}]" if n.hostnames else ""
        node_children.append((f"{n.name}: {n.count} node(s){hosts}", kids))
    top: list[Any] = [(f"compute nodes: {total_nodes} node(s), {total_dev} device(s)", node_children)]
    top.append("network (inter-node): " + (_fmt_link(spec.inter_node_link, "adapter") if spec.inter_node_link
                                           else "unknown (single node, or not probed)"))
    st_children = []
    for st in spec.storage:
        parts = [f"{st.path}: {st.fstype}"]
        if st.free_gb is not None:
            parts.append(f"{st.free_gb:.0f} GB free" + (f" of {st.total_gb:.0f}" if st.total_gb else ""))
        if st.write_gbs is not None:
            parts.append(f"write {st.write_gbs:.2f} GB/s")
        if st.read_gbs is not None:
            parts.append(f"read {st.read_gbs:.2f} GB/s")
        st_children.append(", ".join(parts))
    top.append(("storage", st_children) if st_children else "storage: not described (run clusterlm probe on a node)")
    if spec.scheduler:
        s = spec.scheduler
        parts = [f"{p.name}{'*' if p.default else ''}: {p.avail}, {p.nodes} node(s), limit {p.timelimit or '?'}"
                 + (f", gres {p.gres}" if p.gres and p.gres != "(null)" else "") for p in s.partitions]
        top.append((f"scheduler: {s.kind} {s.version}".rstrip(), parts or ["no partitions listed"]))
    else:
        top.append("scheduler: none found")
    if spec.probe is not None:
        q = spec.probe
        top.append(f"probe: {'DISTURBED' if q.disturbed else 'undisturbed'}: {q.summary()}")
    if spec.notes:
        top.append(("notes", [f"{k}: {v}" for k, v in spec.notes.items()]))
    title = f"cluster {spec.name}" + (f": {spec.description}" if spec.description else "")
    return "\n".join(_tree(title, top))


# ---- CLI --------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    """`clusterlm cluster show SPEC | merge NODE.toml... --out SPEC | presets`."""
    parser = argparse.ArgumentParser(prog="clusterlm cluster", description="Show, merge and list cluster specs.")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="render a spec (file or preset name) as a tree")
    show.add_argument("spec", help="spec TOML file or preset name")
    merge = sub.add_parser("merge", help="merge node specs written by `clusterlm probe --out` into one")
    merge.add_argument("nodes", nargs="+", help="node spec TOML files")
    merge.add_argument("--out", required=True, help="merged spec to write")
    merge.add_argument("--name", default="cluster", help="name of the merged cluster")
    sub.add_parser("presets", help="list bundled presets")
    args = parser.parse_args(argv)
    if args.action == "show":
        print(render_tree(load_spec(args.spec)))
    elif args.action == "merge":
        from clusterlm.fsutil import check_output_path

        check_output_path(args.out, "--out")
        merged = merge_specs([load_spec(p) for p in args.nodes], name=args.name)
        save_spec(merged, args.out)
        print(render_tree(merged))
        print(f"\nwrote {args.out}")
    else:
        for name, path in presets().items():
            spec = load_spec(path)
            print(f"{name:<22} {spec.description}")
    return 0
