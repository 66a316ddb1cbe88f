"""An OpenRouter emulator for tests, demos and benchmarks.

app = create_emulator_app()
app[EMULATOR_STATE].faults.set("anthropic/claude-sonnet-4.5", Fault(status=503))
"""

from .app import create_emulator_app, load_default_catalogue
from .faults import ANY_MODEL, Fault, FaultPlan
from .state import EMULATOR_STATE, EmulatorState, RecordedRequest

__all__ = [
    "ANY_MODEL",
    "EMULATOR_STATE",
    "EmulatorState",
    "Fault",
    "FaultPlan",
    "RecordedRequest",
    "create_emulator_app",
    "load_default_catalogue",
]
