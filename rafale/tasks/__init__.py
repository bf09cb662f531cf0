"""The tasks: what is learned, one file each. This mapping is the only place a task is chosen by its name.

Adding a task: write `rafale/tasks/<name>.py` with a `Task` subclass (base.py says what it can override) and
add it here; a run file selects it with `data.pipeline: "<name>"`. A run gets its own task object (`new_task`,
once per run file): a task keeps its run's state (its settings, the starting model's figures), which no two runs in
one process may share.
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

TASKS: dict[str, type[Task]] = {
    "causal_lm": CausalLM,
    "mlm": MaskedLM,
    "classification": Classification,
    "sft": SupervisedFineTuning,
    "preference": PairedPreference,
    "kto": KTO,
    "ppo": OfflinePPO,
    "reward": RewardModel,
}
# The original's pipeline names, kept so its run files still work.
ALIASES = {"tinystories_neox": "causal_lm", "imdb_bert": "classification"}



def new_task(name: str) -> Task:
    """A fresh task of the kind `name` (a key of TASKS)."""
    return TASKS[name](name)


__all__ = ["ALIASES", "TASKS", "Task", "new_task"]
