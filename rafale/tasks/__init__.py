"""The tasks: what is learned, one file each. This mapping is the only place a task is chosen by its name.

Adding a task: write `rafale/tasks/<name>.py` with a `Task` subclass (base.py says what it can override) and
add it here; a run file selects it with `data.pipeline: "<name>"`.
"""

from rafale.tasks.base import Task
from rafale.tasks.causal_lm import CausalLM
from rafale.tasks.classification import Classification
from rafale.tasks.kto import KTO
from rafale.tasks.mlm import MaskedLM
from rafale.tasks.ppo import OfflinePPO
from rafale.tasks.preference import PairedPreference
from rafale.tasks.reward import RewardModel
from rafale.tasks.sft import SupervisedFineTuning

TASKS: dict[str, Task] = {
    "causal_lm": CausalLM("causal_lm"),
    "mlm": MaskedLM("mlm"),
    "classification": Classification("classification"),
    "sft": SupervisedFineTuning("sft"),
    "preference": PairedPreference("preference"),
    "kto": KTO("kto"),
    "ppo": OfflinePPO("ppo"),
    "reward": RewardModel("reward"),
}
# The original's pipeline names, kept so its run files still work.
ALIASES = {"tinystories_neox": "causal_lm", "imdb_bert": "classification"}

__all__ = ["ALIASES", "TASKS", "Task"]
