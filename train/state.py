"""The train state: what a resumed run needs besides the model and the optimizer.

The step and token count (the same on every rank), and this rank's RNG states and data-loader
state (its own documents, cursors and the cut document's tail), as one object with
`state_dict()` / `load_state_dict()`. The checkpointer saves one per rank.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def rng_states() -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        states["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np
        np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


@dataclass
class TrainState:
    loader: object  # this rank's StatefulDataLoader
    step: int = 0
    tokens: int = 0
    rewound: dict | None = None  # the loader state to save instead of the loader's own (see rewind)

    def advance(self, tokens: int) -> None:
        self.step += 1
        self.tokens += tokens

    def rewind(self, loader_state: dict) -> None:
        """Save this loader state from now on: the one from before a wait for data that a stop interrupted."""
        self.rewound = loader_state

    def state_dict(self) -> dict:
        loader = self.rewound if self.rewound is not None else self.loader.state_dict()
        return {"step": self.step, "tokens": self.tokens, "rng": rng_states(), "loader": loader}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.loader.load_state_dict(state["loader"])
        set_rng_states(state["rng"])
