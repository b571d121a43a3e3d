"""Post-training quantization and the artifact: calibrate -> quantize -> artifact.pgz -> load_artifact.

    calibrate(cfg, run_dir, model=None) -> CalibResult     Hessians into checkpoint/hessians.pt
    quantize(cfg, run_dir, code_bytes=None) -> QuantResult  artifact.pgz + quant_report.json
    load_artifact(path) -> state dict                       dequantized float32, the model's keys
    dequantize_in_memory(entries) -> state dict             identical to load_artifact of the same entries
    size_lines(report_path) -> lines                        the upstream size lines (Code size, Total submission size)

Modules: rows (row scales, RTN), gptq, awq (AWQ-lite group choice), lowrank (LQER factors), calibrate,
groups (roles across layers, similarity sort), artifact (container, layouts, compressors), report
(sizes, table), quantizer (the stage), compare (methods and frontier elements side by side), estimate
(full-size bytes from shapes); compare and estimate are tools, imported by name (pgolf.quantize.compare),
so the single-file train_gpt.py does not carry them. Importing this package imports torch; the CLI
imports it lazily.
"""

from pgolf.quantize.artifact import load_artifact
from pgolf.quantize.calibrate import CalibResult, calibrate
from pgolf.quantize.quantizer import (QuantResult, dequantize_in_memory, quantize, quantize_checkpoint,
                                      quantize_state_dict)
from pgolf.quantize.report import size_lines

__all__ = [
    "CalibResult",
    "QuantResult",
    "calibrate",
    "dequantize_in_memory",
    "load_artifact",
    "quantize",
    "quantize_checkpoint",
    "quantize_state_dict",
    "size_lines",
]
