"""A Llama-family transformer's weights in the linearized student's names: every teacher tensor is reused.

The student keeps the teacher's module names (self_attn.q_proj, mlp.gate_proj, input_layernorm, ...);
only the embedding moves (model.embed_tokens -> model.embeddings, recur's shared name). New
parameters (gated-deltanet's β projection, a learned window weight) keep their init.
"""
from __future__ import annotations

from .configuration_liger import LigerConfig


def student_state(teacher_state: dict) -> dict:
    return {k.replace("model.embed_tokens.", "model.embeddings."): v for k, v in teacher_state.items()}


def from_teacher(teacher_model, **linearization):
    """(LigerForCausalLM with the teacher's weights, its config) from a transformers Llama-family model."""
    from .modeling_liger import LigerForCausalLM

    config = LigerConfig.from_teacher(teacher_model.config, **linearization)
    student = LigerForCausalLM(config)
    missing, unexpected = student.load_state_dict(student_state(teacher_model.state_dict()), strict=False)
    new = {n for n in missing if ".b_proj." in n or n.endswith(".window_mix")}  # new: β, the learned window weight
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    left = sorted(set(missing) - new - tied)
    if left or unexpected:
        raise ValueError(f"the teacher's weights do not fit the student: missing {left[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}")
    return student.eval(), config
