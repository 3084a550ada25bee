"""What a run did, as an object (API) and as one screen of text (CLI)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .export.gguf_file import PlannedTensor
from .methods import LinearReport


def peak_rss_mib() -> float:
    """This process's own peak resident memory.

    VmHWM where Linux has it: ru_maxrss starts a child at its parent's size
    (it is inherited through fork and exec), so it overstates a child's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class QuantReport:
    model: str
    out: Path
    type: str
    method: str
    pure: bool
    tensors: list[PlannedTensor]
    file_size: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    calibration_tokens: int = 0
    linears: list[LinearReport] = field(default_factory=list)
    checksum: str = ""  # sha256 of the tensor data, read back from the written file
    resumed_at_layer: int | None = None
    device: str = "cpu"  # where the calibrated method computed (rtn: always the CPU)
    imatrix: str | None = None  # the importance matrix file rtn's searches were weighted by
    imatrix_tensors: int = 0  # how many tensors it weighted
    card: str | None = None  # the model card written beside the output (--card)
    stages: dict[str, float] = field(default_factory=dict)  # seconds by stage (llmquant.timing), this run
    layer_stages: list[dict] = field(default_factory=list)  # the same per decoder layer

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Tensor-data bits over all parameters (the number llama.cpp prints as BPW)."""
        return 8 * sum(t.nbytes for t in self.tensors) / max(self.n_params, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["n_params"] = self.n_params
        d["bits_per_weight"] = self.bits_per_weight
        return d

    def summary(self) -> str:
        by_type = Counter()
        params_by_type = Counter()
        for t in self.tensors:
            by_type[t.type] += 1
            params_by_type[t.type] += t.n_elements
        lines = [
            f"wrote {self.out}",
            f"  model   {self.model}",
            f"  method  {self.method}   type {self.type}{'  (pure)' if self.pure else ''}   device {self.device}",
            f"  tensors {len(self.tensors)}: "
            + ", ".join(f"{k} x{v} ({params_by_type[k] / 1e6:.1f}M w)" for k, v in sorted(by_type.items())),
            f"  size    {self.file_size / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits per weight, "
            f"{self.n_params / 1e6:.1f}M parameters",
            f"  time    {self.seconds:.1f} s   peak memory {self.peak_rss_mib:.0f} MiB",
        ]
        if self.stages:
            lines.append("  stages  " + stage_line(self.stages))
        lines.append(f"  data    {self.checksum}")
        if self.resumed_at_layer is not None:
            lines.append(f"  resumed after layer {self.resumed_at_layer} of an interrupted run")
        if self.card is not None:
            lines.append(f"  card    {self.card}")
        if self.imatrix is not None:
            lines.append(f"  imatrix {self.imatrix} (weighted {self.imatrix_tensors} tensors)")
        if self.calibration_tokens:
            lines.append(f"  calibration {self.calibration_tokens} tokens")
        errs = [r for r in self.linears if r.err_method is not None and r.err_rtn]
        if errs:
            ratio = sum(r.err_method / r.err_rtn for r in errs) / len(errs)
            lines.append(f"  output error vs rtn: mean ratio {ratio:.3f} over {len(errs)} linears")
        tuned = {r.extra["tune"]["layer"]: r.extra["tune"] for r in self.linears if "tune" in r.extra}.values()
        if tuned:
            ratios = [t["layer_err_tuned"] / t["layer_err_start"] for t in tuned if t["layer_err_start"] > 0]
            kept = sum(t["kept"] == "tuned" for t in tuned)
            mean = f"mean ratio {sum(ratios) / len(ratios):.3f}, " if ratios else ""
            lines.append(f"  tuning: layer output error vs its start {mean}tuned kept in {kept} of {len(tuned)} layers")
        notes = Counter(t.note for t in self.tensors if t.note)
        lines += [f"  note: {n} ({c} tensor{'s' if c > 1 else ''})" for n, c in notes.items()]
        return "\n".join(lines)


def stage_line(stages: dict[str, float]) -> str:
    """``read 0.4 s, forward 12.0 s, ...``, and the method's time as a multiple of the forward passes."""
    parts = [f"{k} {v:.1f} s" for k, v in stages.items() if v >= 0.05]
    if stages.get("forward", 0) > 0:
        floor = stages["forward"] + stages.get("statistics", 0.0)
        parts.append(f"method {stages.get('method', 0.0) / floor:.1f}x the forward passes and statistics")
    return ", ".join(parts) or "-"
