"""Export targets: a lorq model handed to the tools people run (docs/architecture.md).

Each target is one module registered here (``lorq.exporters.base.register_export``);
``export_targets()`` lists them; the job is ``lorq.export`` (``lorq.jobs.export``).
"""

# registry lines: one import per target, in the order `lorq export --help` lists them
from lorq.exporters import peft  # noqa: F401  isort: skip
from lorq.exporters import hf  # noqa: F401  isort: skip
from lorq.exporters import gguf  # noqa: F401  isort: skip
from lorq.exporters import gptq  # noqa: F401  isort: skip
from lorq.exporters import bnb  # noqa: F401  isort: skip
from lorq.exporters.base import (  # isort: skip
    Exported,
    ExportOptions,
    ExportTarget,
    export_target,
    export_targets,
    register_export,
)

__all__ = [
    "ExportOptions",
    "ExportTarget",
    "Exported",
    "export_target",
    "export_targets",
    "register_export",
]
