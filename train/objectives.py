"""What a training step minimises (`train.objective`): the part `Trainer.loss` delegates to.

    objective = build_objective(recipe, config, tokenizer, device, precision)
    loss, logits = objective(engine, batch)   # mean over the micro-batch's scored tokens, student logits

- `NextToken`: the model's own loss, next-token cross entropy (recur.modeling.base.causal_lm_loss).
- `Align`: attention transfer (each converted layer matches the teacher's attention output on the
  teacher's input to it); a linearized model's optional first stage.
- `Distill`: w·KL + (1 - w)·CE, KL(teacher ‖ student) of the next-token distributions at
  temperature T (both logits divided by T, the KL multiplied by T²), in float32, averaged over the
  same scored tokens as the cross entropy (targets not -100, no prediction across a document
  boundary: `scored_mask`). The teacher (`train.teacher`: a transformers causal LM folder or a
  .gguf file) is loaded in float32, frozen, in eval mode, on every rank, outside DeepSpeed. It sees
  the same packed rows with their position_ids, and must not attend across documents: transformers
  builds a block-diagonal causal mask from position_ids when no attention mask is given, which
  `isolates_documents` checks once on the loaded teacher; a teacher that does not is run one
  document segment at a time instead (correct, slower).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from recur.config import RecipeError, first_line


class NextToken:
    """The model's next-token cross entropy."""

    def __call__(self, engine, batch: dict):
        out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     use_cache=False)
        # recur's models do not return logits in training (their loss never holds them all): the loss
        # is the tensor in the graph, 0 when nothing is scored
        return out.loss, out.loss if out.logits is None else out.logits


def scored_mask(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: the predictions (logits[:, :-1]) the cross entropy scores (see evaluator.scored_tokens)."""
    return (labels[:, 1:] != -100) & (position_ids[:, 1:] != 0)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over the masked predictions of KL(softmax(teacher / T) ‖ softmax(student / T)), in float32."""
    t = temperature
    student = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total * (t * t) / mask.sum().clamp(min=1)


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of the documents of one row: a new one wherever the position does not go up by 1."""
    starts = [0] + [i for i in range(1, len(position_ids)) if int(position_ids[i]) != int(position_ids[i - 1]) + 1]
    return list(zip(starts, starts[1:] + [len(position_ids)]))


class Distill:
    def __init__(self, teacher, temperature: float = 1.0, weight: float = 1.0, autocast_dtype=None):
        self.teacher, self.temperature, self.weight = teacher, temperature, weight
        self.autocast_dtype = autocast_dtype  # bf16 runs on GPU: the teacher's matmuls in bf16 too
        self.packed = isolates_documents(teacher)

    def teacher_logits(self, batch: dict) -> torch.Tensor:
        ids, positions = batch["input_ids"], batch["position_ids"]
        device = ids.device
        with torch.no_grad(), torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                             enabled=self.autocast_dtype is not None):
            if self.packed:
                return self.teacher(input_ids=ids, position_ids=positions, use_cache=False).logits
            rows = []
            for b in range(ids.shape[0]):
                rows.append(torch.cat([self.teacher(input_ids=ids[b:b + 1, s:e], position_ids=positions[b:b + 1, s:e],
                                                    use_cache=False).logits
                                       for s, e in segments(positions[b])], dim=1))
            return torch.cat(rows, dim=0)

    def __call__(self, engine, batch: dict):
        from recur.modeling.base import causal_lm_loss

        # no labels: the model returns its logits (the KL needs them), and the cross entropy is taken here
        out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        kl = distill_kl(out.logits, self.teacher_logits(batch), scored_mask(batch["labels"], batch["position_ids"]),
                        self.temperature)
        if self.weight == 1:
            return kl, out.logits
        ce = causal_lm_loss(out.logits, batch["labels"], batch["position_ids"])
        return self.weight * kl + (1 - self.weight) * ce, out.logits


class Align:
    """Attention transfer (LoLCATs' stage 1): each converted attention layer of the student, given the
    teacher's input to that layer, matches the teacher's attention output (mean squared error, in
    float32); the layers learn independently (the inputs are the teacher's, detached). The loss is the
    mean over the layers that are not kept as softmax attention. Student and teacher both have
    `model.layers[i].self_attn` (recur_liger keeps the teacher's names)."""

    def __init__(self, teacher):
        self.teacher, self.inputs, self.outputs = teacher, {}, {}
        for i, layer in enumerate(teacher.model.layers):
            layer.self_attn.register_forward_pre_hook(self._keeper(self.inputs, i, output=False), with_kwargs=True)
            layer.self_attn.register_forward_hook(self._keeper(self.outputs, i, output=True), with_kwargs=True)

    @staticmethod
    def _keeper(store, i, output):
        def keep(module, args, kwargs, *result):
            if output:
                store[i] = result[0][0] if isinstance(result[0], tuple) else result[0]
            else:
                store[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return keep

    def __call__(self, engine, batch: dict):
        from recur.modeling.base import Layout, sequence_layout

        ids, positions = batch["input_ids"], batch["position_ids"]
        with torch.no_grad():
            self.teacher(input_ids=ids, position_ids=positions, use_cache=False)
        student = engine.module.get_base_model() if hasattr(engine.module, "get_base_model") else engine.module
        B, T = ids.shape
        positions, pad, cu_seqlens = sequence_layout((B, T), None, positions)
        if cu_seqlens is not None:  # packed documents: one row, as the model's own forward lays them out
            positions = positions.reshape(1, -1)
        layout = Layout(positions, pad, cu_seqlens)
        losses = []
        for i, layer in enumerate(student.model.layers):
            if getattr(layer.self_attn, "kind", None) == "attention":
                continue  # kept as the teacher's attention: nothing to learn
            x = self.inputs[i].reshape(1, B * T, -1) if cu_seqlens is not None else self.inputs[i]
            out = layer.self_attn(x.to(next(layer.parameters()).dtype), layout, None).reshape(B, T, -1)
            losses.append(F.mse_loss(out.float(), self.outputs[i].float()))
        loss = torch.stack(losses).mean()
        return loss, loss.view(1)  # (no logits: the trainer only needs a tensor in the graph)


def isolates_documents(model) -> bool:
    """Whether the model, given packed position_ids and no attention mask, keeps documents apart: the
    second of two packed documents gets the logits it gets alone."""
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = (torch.arange(8, device=device) * 7 + 3).remainder(vocab)[None]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 4:]
        alone = model(input_ids=ids[:, 4:], position_ids=positions[:, 4:], use_cache=False).logits[0]
    return torch.allclose(packed.float(), alone.float(), rtol=1e-4, atol=1e-4)


def load_teacher(spec: str, device):
    """The teacher in float32, eval mode, frozen, on `device`; a one-line RecipeError when it cannot load."""
    from transformers import AutoModelForCausalLM

    import recur  # noqa: F401  registers the families (a recur model can teach too)

    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for a folder or GGUF file it cannot read
        raise RecipeError(f"train.teacher: transformers cannot load {spec} as a causal LM "
                          f"({type(e).__name__}: {first_line(e)})") from None
    model.requires_grad_(False)
    return model.to(device).eval()


def teacher_tokens(spec: str) -> dict | None:
    """The teacher's token -> id map when its folder (or GGUF file) has a tokenizer, else None."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).get_vocab()
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(path).get_vocab()
    except Exception:  # no usable tokenizer there: only the sizes are compared
        return None
    return None


def check_teacher_vocab(teacher, config, tokenizer, spec: str) -> None:
    """The teacher's output rows must be the student's vocabulary, and its tokenizer (if it has one) ours."""
    rows = teacher.get_output_embeddings().weight.shape[0]
    if rows != config.vocab_size:
        raise RecipeError(f"train.teacher: {spec} predicts {rows} tokens, the student's vocab_size is "
                          f"{config.vocab_size}: distillation needs the same vocabulary")
    tokens = teacher_tokens(spec)
    if tokens is not None and tokens != tokenizer.get_vocab():
        raise RecipeError(f"train.teacher: {spec} has another tokenizer than data.tokenizer "
                          f"({len(tokens)} tokens there, {len(tokenizer)} here, or the same ids for other tokens)")


def build_objective(recipe, config, tokenizer, device, precision: str):
    t = recipe.train
    if t.objective == "next_token":
        return NextToken()
    teacher = load_teacher(t.teacher, device)
    if t.objective == "align":
        layers = getattr(getattr(teacher, "model", None), "layers", None)
        if layers is None or len(layers) != config.num_hidden_layers or not hasattr(layers[0], "self_attn"):
            raise RecipeError(f"train.teacher: {t.teacher} has no model.layers[i].self_attn for each of the student's "
                              f"{config.num_hidden_layers} layers (train.objective align needs the model it was "
                              "converted from)")
        if not isolates_documents(teacher):
            raise RecipeError(f"train.teacher: {t.teacher} attends across packed documents; align needs one that "
                              "keeps them apart from position_ids")
        return Align(teacher)
    check_teacher_vocab(teacher, config, tokenizer, t.teacher)
    dtype = torch.bfloat16 if precision == "bf16" and torch.device(device).type == "cuda" else None
    return Distill(teacher, t.distill_temperature, t.distill_weight, dtype)
