"""Experiment config: typed, validated at load, every problem reported at once.

A config is YAML that mirrors these models one to one. CLI flags and
``--set key.sub=value`` overrides edit the same tree before validation, so a
typo in an override gets the same message as a typo in the file.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from peftlab.errors import ConfigError

logger = logging.getLogger(__name__)


class _Strict(BaseModel):
    """Frozen model that rejects unknown keys."""

    # allow_inf_nan=False: `learning_rate: .inf` and friends are config errors, not a run that trains to NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


# --------------------------------------------------------------------------- data


class SplitConfig(_Strict):
    """How one table is cut into train/validation/test."""

    train: float = Field(0.8, gt=0, le=1, description="Fraction of rows for training.")
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction for per-epoch evaluation and best-epoch choice.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction held out for the final report; 0 reuses validation.")
    seed: int = Field(42, description="Seed of the shuffle; the same seed gives the same split for every method.")
    stratify: bool = Field(True, description="Keep class proportions equal across splits.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.validation + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"split ratios must sum to 1, got train {self.train} + validation {self.validation} "
                f"+ test {self.test} = {total:g}"
            )
        if self.validation == 0 and self.test == 0:
            raise ValueError("validation and test are both 0: nothing to evaluate on; give validation a share")
        return self


class GivenSplits(_Strict):
    """Files (or ``datasets`` split names) that already hold each split."""

    train: str
    validation: str | None = None
    test: str | None = None


class LabelBins(_Strict):
    """Turn a numeric score column into classes: ``edges`` cut the score line into ``labels``."""

    edges: list[float] = Field(min_length=1)
    labels: list[str] = Field(min_length=2)

    @model_validator(mode="after")
    def _shape(self) -> "LabelBins":
        if len(self.labels) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges cut the line into {len(self.edges) + 1} bins, "
                             f"but {len(self.labels)} labels were given")
        if sorted(self.edges) != self.edges:
            raise ValueError(f"edges must be increasing, got {self.edges}")
        return self


class DataConfig(_Strict):
    """Where the data is and how rows become (text, label) examples."""

    path: str | None = Field(None, description="CSV/TSV/JSON/JSONL file, a folder or glob of such files (read in sorted "
                                               "order, one format), a `datasets` save_to_disk folder, or `shipped:NAME`.")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "datasets"] = "auto"
    record_path: str | None = Field(None, description="Dotted path to the record list inside a nested JSON file, e.g. `data`.")
    header: bool = Field(True, description="CSV/TSV: the first line holds column names.")
    column_names: list[str] | None = Field(None, description="CSV/TSV without a header: names of the columns.")
    text_column: str = "text"
    template: str | None = Field(None, description="Causal LM: build the text from several columns, e.g. '\"{quote}\" - {author}'.")
    label_column: str = "label"
    label_map: dict[str, str] | None = Field(
        None, description="Raw label -> class name, e.g. {-1: 부정, 0: 중립, 1: 긍정}. Rows with other labels are dropped."
    )
    label_bins: LabelBins | None = Field(None, description="Numeric label column cut into classes by edges.")
    clean: Literal["none", "basic", "korean"] = Field(
        "none", description="basic: strip HTML and normalise whitespace; korean: also keep only Hangul, Latin, digits and basic punctuation."
    )
    drop_duplicates: bool = Field(True, description="Drop repeated texts (keeps the first) so no text is in two splits.")
    max_length: int = Field(128, gt=0, le=8192, description="Tokens per example; longer texts are truncated and counted.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    splits: GivenSplits | None = Field(None, description="Use given splits instead of cutting one table.")
    max_train_samples: int | None = Field(None, gt=0, description="Keep only the first N training rows (after the split).")
    max_eval_samples: int | None = Field(None, gt=0, description="Keep only the first N validation and N test rows.")

    @field_validator("label_map", mode="before")
    @classmethod
    def _stringify_keys(cls, value: Any) -> Any:
        # YAML reads `-1: 부정` with an int key; raw labels are compared as strings.
        if isinstance(value, dict):
            return {label_key(k): str(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.path is None and self.splits is None:
            raise ValueError("give data.path (one table to split) or data.splits (train/validation/test files)")
        if self.label_map is not None and self.label_bins is not None:
            raise ValueError("use either data.label_map or data.label_bins, not both")
        if not self.header and not self.column_names:
            raise ValueError("data.header is false: list the columns in data.column_names")
        return self


def label_key(value: Any) -> str:
    """Canonical string for a raw label: 1, 1.0, '1' and ' 1 ' all become '1'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


# --------------------------------------------------------------------------- model


class ModelConfig(_Strict):
    """The pretrained model every method starts from."""

    path: str = Field("minilm-l6", description="A shipped alias (see `peftlab models list`) or a local Hugging Face folder.")
    trust_remote_code: bool = Field(False, description="Run the model folder's own Python code (needed by e.g. KoBERT). Only for folders you trust.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on GPUs that support it."
    )
    allow_pickle: bool = Field(False, description="Allow loading weights stored as pickle (.bin); safetensors only by default.")


# --------------------------------------------------------------------------- methods


class MethodName(str, Enum):
    """Every selectable fine-tuning method."""

    FULL = "full"
    LORA = "lora"
    DORA = "dora"
    IA3 = "ia3"
    PROMPT_TUNING = "prompt_tuning"
    PREFIX_TUNING = "prefix_tuning"
    P_TUNING = "p_tuning"
    ADALORA = "adalora"
    LOHA = "loha"
    RSLORA = "rslora"
    LOKR = "lokr"
    VERA = "vera"
    OFT = "oft"
    BOFT = "boft"
    FOURIERFT = "fourierft"
    HRA = "hra"
    LN_TUNING = "ln_tuning"
    C3A = "c3a"
    BITFIT = "bitfit"
    PEFT = "peft"  # any peft tuner by its PeftType name


# Methods whose saved folder is a whole model (config.json + model.safetensors), not an adapter on a base.
WHOLE_MODEL_METHODS = frozenset({MethodName.FULL.value, MethodName.BITFIT.value})

_TARGETS = ("Module names to adapt, or all-linear (every linear layer but the head); default: peft's choice for the "
            "architecture (query/value for BERT-likes, q_proj/v_proj for Llama).")
Targets = Union[list[str], Literal["all-linear"], None]


class _MethodBase(_Strict):
    name: str | None = Field(None, description="Name of this run in reports and folders; defaults to the method name.")
    learning_rate: float = Field(gt=0, description="Peak learning rate.")

    @property
    def run_name(self) -> str:
        return self.name or self.method  # type: ignore[attr-defined]


class FullConfig(_MethodBase):
    """Full fine-tuning: every weight is trained and the whole model is saved."""

    method: Literal["full"] = "full"
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class BitFitConfig(_MethodBase):
    """BitFit: only the bias terms (and the classifier head) train; the whole model is saved, like full."""

    method: Literal["bitfit"] = "bitfit"
    learning_rate: float = Field(1.2e-3, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class _LoraLike(_MethodBase):
    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter's input during training.")
    target_modules: Targets = Field(None, description=_TARGETS)
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate.")


_LORA_INIT = ("How A and B start. default: B = 0, so training starts from the base model; gaussian: A Gaussian "
              "instead of Kaiming; pissa / olora: A and B hold the weight's principal singular directions (PiSSA) or "
              "its QR factors (OLoRA) and the base keeps the rest. A pissa / olora adapter is saved converted to a "
              "plain LoRA of rank 2r on the unchanged base, so plain peft loads it.")


class LoraConfig(_LoraLike):
    """LoRA: low-rank updates on chosen linear layers; classifier head trained and saved with the adapter."""

    method: Literal["lora"] = "lora"
    learning_rate: float = Field(1.1e-3, gt=0, description="Peak learning rate (tuned: docs/methods.md).")
    use_rslora: bool = Field(False, description="Scale the update by alpha / sqrt(r) (rsLoRA; see method rslora).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field("default", description=_LORA_INIT)


class RsLoraConfig(_LoraLike):
    """rsLoRA: LoRA scaled by alpha / sqrt(r) instead of alpha / r, so that high ranks keep learning."""

    method: Literal["rslora"] = "rslora"
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate (tuned: docs/methods.md).")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field("default", description=_LORA_INIT)
    r: int = Field(64, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(64, gt=0, description="Scaling numerator: the update is scaled by alpha / sqrt(r).")


class DoraConfig(_LoraLike):
    """DoRA: LoRA with a learned magnitude per output feature."""

    method: Literal["dora"] = "dora"
    learning_rate: float = Field(1.2e-3, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class LohaConfig(_LoraLike):
    """LoHa: low-rank Hadamard product updates."""

    method: Literal["loha"] = "loha"
    learning_rate: float = Field(4.7e-3, gt=0, description="Peak learning rate (tuned: docs/methods.md).")
    r: int = Field(4, gt=0, description="Rank of the update matrices (tuned: docs/methods.md).")
    target_modules: Targets = Field("all-linear", description=_TARGETS + " Tuned: docs/methods.md.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Probability of skipping the adapter for a step (module dropout).")


class LokrConfig(_LoraLike):
    """LoKr: the update is a Kronecker product of a small factor and a low-rank one."""

    method: Literal["lokr"] = "lokr"
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping the adapter for a step (module dropout).")
    decompose_factor: int = Field(-1, description="Kronecker factor size each dimension is split by; -1: the split "
                                                  "closest to square.")
    learning_rate: float = Field(8.1e-3, gt=0, description="Peak learning rate (tuned: docs/methods.md).")

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("decompose_factor is -1 (closest to square) or a positive factor, e.g. 4")
        return value


class AdaLoraConfig(_LoraLike):
    """AdaLoRA: LoRA whose rank budget is reallocated during training."""

    method: Literal["adalora"] = "adalora"
    init_r: int = Field(12, gt=0, description="Starting rank of every layer.")
    r: int = Field(8, gt=0, description="Average target rank after pruning.")
    tinit_fraction: float = Field(0.1, ge=0, lt=1, description="Share of steps before pruning starts.")
    tfinal_fraction: float = Field(0.2, ge=0, lt=1, description="Share of final steps with fixed ranks.")
    learning_rate: float = Field(2.4e-3, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class Ia3Config(_MethodBase):
    """IA3: learned rescaling vectors on attention and feed-forward activations."""

    method: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(None, description="Module names to rescale; default: peft's choice for "
                                                               "the architecture (key, value, output.dense for BERT).")
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward layers (rescaled at their input); default: peft's.")
    learning_rate: float = Field(3.6e-2, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class VeraConfig(_MethodBase):
    """VeRA: frozen random projections shared by all layers; each layer learns two scaling vectors."""

    method: Literal["vera"] = "vera"
    r: int = Field(128, gt=0, description="Rank of the shared frozen projections; each layer trains r + out_features "
                                          "values.")
    d_initial: float = Field(0.1, gt=0, description="Initial value of the d scaling vector (the VeRA paper "
                                                    "recommends 0.1 or less).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input during training.")
    target_modules: Targets = Field(None, description=_TARGETS)
    learning_rate: float = Field(4.8e-2, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class OftConfig(_MethodBase):
    """OFT: each adapted layer is multiplied by a learned block-diagonal orthogonal matrix."""

    method: Literal["oft"] = "oft"
    block_size: int = Field(32, gt=0, description="Size of each orthogonal block; must divide the layer's input "
                                                  "features (the number of blocks follows).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Probability of setting a block to identity for a step "
                                                        "(multiplicative dropout).")
    target_modules: Targets = Field(None, description=_TARGETS)
    learning_rate: float = Field(2.8e-3, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class BoftConfig(_MethodBase):
    """BOFT: OFT whose orthogonal matrix is a product of sparse butterfly factors."""

    method: Literal["boft"] = "boft"
    block_size: int = Field(4, gt=0, description="Size of each butterfly block; must divide the layer's input "
                                                 "features.")
    butterfly_factor: int = Field(1, gt=0, description="Number of butterfly factors (1: plain block-diagonal OFT).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Probability of setting a block to identity for a step "
                                                        "(multiplicative dropout).")
    target_modules: Targets = Field(None, description=_TARGETS)
    learning_rate: float = Field(2.1e-2, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class HraConfig(_MethodBase):
    """HRA: each adapted layer is multiplied by a chain of r learned Householder reflections."""

    method: Literal["hra"] = "hra"
    r: int = Field(8, gt=0, description="Householder reflections per layer; even values keep peft's identity start.")
    apply_gs: bool = Field(False, description="Gram-Schmidt-orthogonalise the reflection vectors.")
    target_modules: Targets = Field(None, description=_TARGETS)
    learning_rate: float = Field(2.8e-2, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class FourierFtConfig(_MethodBase):
    """FourierFT: each layer learns a few spectral coefficients; the update is their inverse 2-D Fourier transform."""

    method: Literal["fourierft"] = "fourierft"
    n_frequency: int = Field(1000, gt=0, description="Learned frequencies per layer (at most in x out features); "
                                                     "the layer's trainable parameter count.")
    scaling: float = Field(100.0, gt=0, description="Scale of the update (like LoRA's alpha); peft suggests 100-150 "
                                                    "for encoders, 300 for Llama-like models (tuned: docs/methods.md).")
    target_modules: Targets = Field(None, description=_TARGETS)
    learning_rate: float = Field(8.4e-2, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class C3aConfig(_MethodBase):
    """C3A: the update is a block-circulant matrix, applied as a circular convolution (FFT)."""

    method: Literal["c3a"] = "c3a"
    block_size: int = Field(64, gt=0, description="Circulant block size; must divide each adapted layer's input and "
                                                  "output features (smaller: more parameters).")
    target_modules: Targets = Field(None, description=_TARGETS)
    learning_rate: float = Field(1.1e-1, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class LnTuningConfig(_MethodBase):
    """LN tuning: only the layer norms (and the classifier head) train, as an adapter."""

    method: Literal["ln_tuning"] = "ln_tuning"
    target_modules: list[str] | None = Field(
        None, description="Norm module names to train; default: peft's choice for the architecture, or LayerNorm "
                          "for BERT-likes.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class PromptTuningConfig(_MethodBase):
    """Prompt tuning: trainable virtual token embeddings prepended to the input."""

    method: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int | None = Field(
        None, gt=0, description="Virtual tokens; default 20, or the init text's token count with init TEXT."
    )
    init: Literal["RANDOM", "TEXT"] = Field("RANDOM", description="RANDOM embeddings, or TEXT: the embeddings of "
                                                                  "init_text's tokens.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the prompt (init TEXT).")
    learning_rate: float = Field(2.8e-1, gt=0, description="Peak learning rate (tuned: docs/methods.md).")

    @field_validator("init", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _text_needs_text(self) -> "PromptTuningConfig":
        if self.init == "TEXT" and not self.init_text:
            raise ValueError("init TEXT needs init_text, e.g. init_text: 'Classify the sentiment of this review'")
        return self


class PrefixTuningConfig(_MethodBase):
    """Prefix tuning: trainable key/value prefixes in every attention layer."""

    method: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix length (virtual tokens per attention layer).")
    prefix_projection: bool = Field(False, description="Reparameterise the prefix through an MLP.")
    learning_rate: float = Field(1.4e-2, gt=0, description="Peak learning rate (tuned: docs/methods.md).")


class PTuningConfig(_MethodBase):
    """P-tuning: virtual tokens produced by a small trainable prompt encoder."""

    method: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens prepended to every input.")
    encoder_hidden_size: int = Field(128, gt=0, description="Hidden size of the prompt encoder.")
    encoder_type: Literal["MLP", "LSTM"] = Field("MLP", description="Architecture of the prompt encoder.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")


# Fields of every peft config class that peftlab sets itself (or that describe a saved adapter, not a tuner).
PEFT_RESERVED_OPTIONS = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                         "auto_mapping", "peft_version")


class PeftTunerConfig(_MethodBase):
    """Any peft tuner by its PeftType name, with that config class's own options (peft's defaults for the rest)."""

    method: Literal["peft"] = "peft"
    peft_type: str = Field(description="A peft PeftType name, e.g. LOKR, SHIRA, ROAD (case-insensitive).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of that type's peft config "
                                                                      "class, e.g. {r: 16} for LOKR; task_type is "
                                                                      "peftlab's.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")

    @field_validator("peft_type", mode="before")
    @classmethod
    def _upper_type(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _peft_accepts(self) -> "PeftTunerConfig":
        problem = peft_options_problem(self.peft_type, self.options)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"peft_{self.peft_type.lower()}"


def peft_options_problem(peft_type: str, options: dict[str, Any]) -> str | None:
    """What peft says against ``options`` for ``peft_type`` (None: it accepts them), naming the valid options.

    peft's config classes are dataclasses: an unknown keyword is a TypeError naming one option, a bad value a
    ValueError from ``__post_init__``. Imports peft (and torch) on first use, only for configs that use `peft`.
    """
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    types = sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
    config_class = next((c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if str(getattr(t, "value", t)) == peft_type),
                        None)
    if config_class is None:
        hint = difflib.get_close_matches(peft_type, types, n=1)
        guess = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"peft_type {peft_type!r} is not a peft tuner{guess} (peft's types: {', '.join(types)})"
    valid = [f.name for f in dataclasses.fields(config_class) if f.init and f.name not in PEFT_RESERVED_OPTIONS]
    unknown = [key for key in options if key not in valid]
    reserved = [key for key in unknown if key in PEFT_RESERVED_OPTIONS]
    if reserved:
        return f"options.{reserved[0]}: peftlab sets {reserved[0]} itself; remove it"
    if unknown:
        hint = difflib.get_close_matches(unknown[0], valid, n=1)
        guess = f"; did you mean {hint[0]!r}?" if hint else ""
        return (f"options.{unknown[0]}: {config_class.__name__} has no option {unknown[0]!r}{guess} "
                f"(valid: {', '.join(valid)})")
    try:
        config_class(**options)
    except (TypeError, ValueError) as exc:
        return f"options: peft's {config_class.__name__} rejects them: {exc}"
    return None


MethodConfig = Annotated[
    Union[
        FullConfig,
        LoraConfig,
        DoraConfig,
        Ia3Config,
        PromptTuningConfig,
        PrefixTuningConfig,
        PTuningConfig,
        AdaLoraConfig,
        LohaConfig,
        RsLoraConfig,
        LokrConfig,
        VeraConfig,
        OftConfig,
        BoftConfig,
        FourierFtConfig,
        HraConfig,
        LnTuningConfig,
        C3aConfig,
        BitFitConfig,
        PeftTunerConfig,
    ],
    Field(discriminator="method"),
]

METHOD_CONFIGS: dict[str, type[_MethodBase]] = {
    typing.get_args(cls.model_fields["method"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(MethodConfig)[0])
}


# --------------------------------------------------------------------------- training / output


MACRO_METRICS = ("f1_macro", "recall_macro", "precision_macro")  # where every class counts alike


class TrainingConfig(_Strict):
    """One training recipe shared by every method, so differences come from the method alone."""

    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    seed: int = 42
    method_process: bool = Field(
        True, description="Train each method (and seed) in a child process of its own: its peak memory is then its "
                          "own, whatever ran before it, and a crash costs only that method. Off: one process, faster "
                          "to start (about 5 s per method).")
    metric_for_best_model: Literal["f1_macro", "accuracy", "precision_macro", "recall_macro", "loss"] = Field(
        "f1_macro", description="Validation metric that picks the best epoch (causal LMs always use loss)."
    )
    early_stopping_patience: int | None = Field(None, gt=0, description="Stop after this many epochs without improvement.")
    group_by_length: bool = Field(True, description="Batch texts of similar length together: less padding, faster steps.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    dataloader_num_workers: int = Field(0, ge=0)
    seeds: list[int] | None = Field(
        None, description="Train every method once per seed and report mean ± std and per-seed rows; "
                          "default: [training.seed]. The data split keeps data.split.seed, so every seed sees the same test rows."
    )
    class_weights: Literal["auto", "none", "balanced"] | dict[str, float] = Field(
        "auto", description="Weighted cross-entropy for imbalanced classes: none; balanced (n_rows / (n_classes * "
                            "class_rows) on the train split, as scikit-learn defines it); {class name: weight}, "
                            "unnamed classes weigh 1; or auto (the default): balanced when the best epoch is chosen "
                            "by a macro metric (f1/recall/precision_macro) of a classification, else none. Measured "
                            "on the default experiment, balanced raised test macro F1 by 0.055 (full), 0.084 (lora) "
                            "and 0.055 (prompt_tuning) (docs/class_weights.md). The saved config records the "
                            "resolved value."
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers, each an optional extra (pip install 'peftlab[tracking]'): one tracking run "
                    "per method and seed with its settings, per-epoch train and validation metrics, final test "
                    "metrics and costs, and the report. tensorboard: event files in RUN_DIR/tensorboard/<run>; "
                    "mlflow: the server in MLFLOW_TRACKING_URI if set, else a file store in RUN_DIR/mlruns. "
                    "Tuning trials are not tracked."
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("training.seeds is empty: give at least one seed, e.g. [42, 43, 44], or remove the key "
                             "to use training.seed")
        repeated = sorted({s for s in value if value.count(s) > 1})
        if repeated:
            raise ValueError(f"training.seeds repeats {repeated}: a repeated seed trains the same run twice and "
                             f"shrinks the spread; list each seed once")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_or_none(cls, value: Any) -> Any:
        # `--set training.report_to=mlflow` gives a string; `none` is the Trainer's word for no tracker.
        if isinstance(value, str):
            return [] if value == "none" else [value]
        if isinstance(value, list) and len(set(map(str, value))) < len(value):
            raise ValueError(f"training.report_to repeats a tracker: {value}; list each once")
        return value

    @model_serializer(mode="wrap")
    def _omit_empty_report_to(self, handler: Any) -> Any:
        # Without trackers the key is left out of dumps, so a config.yaml (or a tuning study's fingerprint) from
        # before the field existed still compares equal on --resume.
        data = handler(self)
        if isinstance(data, dict) and not self.report_to:
            data.pop("report_to", None)
        return data

    @field_validator("class_weights", mode="before")
    @classmethod
    def _stringify_weight_keys(cls, value: Any) -> Any:
        # YAML reads `{1: 2.0}` with an int key; class names are strings.
        if isinstance(value, dict):
            return {label_key(k): v for k, v in value.items()}
        return value

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if not value:
                raise ValueError("training.class_weights is an empty mapping: name classes, e.g. {neutral: 2.0}, "
                                 "or use none / balanced")
            bad = {k: w for k, w in value.items() if not (math.isfinite(w) and w > 0)}
            if bad:
                raise ValueError(f"training.class_weights must be positive finite numbers; got {bad}")
        return value

    @property
    def run_seeds(self) -> list[int]:
        """The seeds each method is trained with: ``seeds``, or ``[seed]`` when not given."""
        return list(self.seeds) if self.seeds is not None else [self.seed]


class GenerationConfig(_Strict):
    """Causal LM: prompts generated from before and after training, with stated decoding settings."""

    prompts: list[str] = Field(default_factory=list)
    max_new_tokens: int = Field(40, gt=0, le=2048)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class ReportConfig(_Strict):
    """How the report judges differences: bootstrap intervals on the test split, each method against a reference."""

    reference: str | None = Field(
        None, description="Run name every other method is compared against; default: the full fine-tuning run if "
                          "there is one, else the first method."
    )
    bootstrap_samples: int = Field(1000, ge=100, le=100_000,
                                   description="Resamples of the test rows per interval (cost: linear, ~ms per 1,000 rows).")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Coverage of the percentile bootstrap intervals.")
    seed: int = Field(0, description="Seed of the resampling: the same seed gives the same intervals.")


class SearchRange(_Strict):
    """A range to search a number in (learning rates: on a log scale)."""

    low: float = Field(gt=0, description="Lowest value tried.")
    high: float = Field(gt=0, description="Highest value tried.")

    @model_validator(mode="after")
    def _ordered(self) -> "SearchRange":
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}: swap them, e.g. "
                             f"{{low: {self.high:g}, high: {self.low:g}}}")
        return self


def _override_kind(value: Any) -> str:
    return "choices" if isinstance(value, (list, tuple)) else "range"


# A range ({low, high}) or a list of choices; the tag picks one, so an error names only the form given.
SearchOverride = Annotated[
    Union[Annotated[SearchRange, Tag("range")], Annotated[list[Union[bool, int, float, str]], Tag("choices")]],
    Discriminator(_override_kind),
]


class TuneConfig(_Strict):
    """`peftlab tune` / `run --tune`: an Optuna study per method on the validation split, one budget for all."""

    trials: int = Field(20, gt=0, description="Trials per method: the same budget for every method (a resumed or "
                                              "shared study counts the trials it already holds).")
    seed: int | None = Field(None, description="Seed of the TPE sampler; default training.seed.")
    startup_trials: int | None = Field(
        None, gt=0, description="Random trials before TPE models the results, besides trial 0 (the configured "
                                "settings, with include_defaults); default a third of the rest of the budget (at "
                                "least 1, at most 10).")
    pruner: Literal["median", "none"] = Field(
        "median", description="median: stop a trial whose validation metric after an epoch is below the median of "
                              "earlier trials at that epoch (never after its last epoch, when the trial is complete); none: every "
                              "trial trains to the end.")
    prune_after_trials: int = Field(2, ge=0, description="Trials that always run to the end before pruning starts.")
    prune_warmup_epochs: int = Field(0, ge=0, description="Evaluations (epochs) before a trial may be pruned.")
    include_defaults: bool = Field(True, description="Trial 0 of each method uses the config's own settings, so a "
                                                     "tuned method is never worse on validation than its defaults.")
    search: dict[str, dict[str, SearchOverride]] = Field(
        default_factory=dict, description="Per method run name: parameter -> {low, high} (a range) or a list of "
                                          "choices, replacing the method's own search space for that parameter, "
                                          "e.g. {lora: {learning_rate: {low: 1e-4, high: 1e-2}, r: [8, 16]}}.")

    @field_validator("search")
    @classmethod
    def _no_empty_choices(cls, value: dict[str, Any]) -> dict[str, Any]:
        for method, params in value.items():
            for name, override in params.items():
                if isinstance(override, list) and not override:
                    raise ValueError(f"tune.search.{method}.{name} is an empty list: give at least one choice")
        return value


class OutputConfig(_Strict):
    dir: str | None = Field(None, description="Run directory; default runs/<config file name>.")


class ExperimentConfig(_Strict):
    """One experiment: the data, the model, the methods to compare, how to train and where to write."""

    name: str | None = None
    task: Literal["classification", "causal-lm"] = "classification"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    methods: list[MethodConfig] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("methods", mode="before")
    @classmethod
    def _expand_short_names(cls, value: Any) -> Any:
        # `methods: [full, lora]` is shorthand for `[{method: full}, {method: lora}]`;
        # `{name: lora_r16, method: lora}` and `{name: lora}` (name is the method) also work.
        if not isinstance(value, list):
            return value
        expanded = []
        for item in value:
            if isinstance(item, str):
                item = {"method": item}
            elif isinstance(item, dict) and "method" not in item and item.get("name") in METHOD_CONFIGS:
                item = {**item, "method": item["name"]}
            expanded.append(item)
        return expanded

    @model_validator(mode="after")
    def _unique_names(self) -> "ExperimentConfig":
        names = [m.run_name for m in self.methods]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"methods share the name(s) {duplicated}: give each a distinct `name:`")
        bad = [n for n in names if not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"method names {bad} must be letters, digits, '-' and '_' only (they become folder names)")
        return self

    @model_validator(mode="after")
    def _statistics_settings(self) -> "ExperimentConfig":
        names = [m.run_name for m in self.methods]
        if self.report.reference is not None and self.report.reference not in names:
            raise ValueError(f"report.reference {self.report.reference!r} is not a method of this config; "
                             f"choose one of {', '.join(names)}")
        unknown = [n for n in self.tune.search if n not in names]
        if unknown:
            raise ValueError(f"tune.search names {', '.join(unknown)}, not a method of this config; its methods are "
                             f"{', '.join(names)}")
        if self.task != "classification" and self.training.class_weights != "none":
            raise ValueError("training.class_weights applies to classification only; remove it for task "
                             f"{self.task}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_class_weights(cls, data: Any) -> Any:
        # Resolved here, where the task is known, so config.yaml and every reader see the value that trained.
        if not isinstance(data, dict):
            return data
        training = data.get("training")
        if training is None:
            training = {}
        if not isinstance(training, dict) or training.get("class_weights", "auto") != "auto":
            return data
        macro = (data.get("task", "classification") == "classification"
                 and training.get("metric_for_best_model", "f1_macro") in MACRO_METRICS)
        return {**data, "training": {**training, "class_weights": "balanced" if macro else "none"}}

    def method(self, run_name: str) -> Any:
        """The method config whose run name is ``run_name``."""
        for m in self.methods:
            if m.run_name == run_name:
                return m
        raise KeyError(run_name)


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate.

    Args:
        path: the YAML file (relative data/model paths are resolved against its folder).
        overrides: dotted assignments such as ``training.epochs=1`` or ``methods.lora.r=16``.
        data: an already-parsed config tree to use instead of ``path``.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: listing every problem found, each with its key and the fix.
    """
    if data is None:
        if path is None:
            raise ConfigError("no config given: pass a YAML file, e.g. `peftlab run configs/default.yaml`")
        data = _read_yaml(Path(path))
    tree = copy.deepcopy(data)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, methods, ...), got {type(tree).__name__}")
    for item in overrides or []:
        _apply_override(tree, item)
    if path is not None:
        _resolve_relative_paths(tree, Path(path).resolve().parent)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        where = f"{path}" if path is not None else "config"
        problems = "\n".join(f"  - {_describe(err)}" for err in exc.errors())
        raise ConfigError(f"{where} has {exc.error_count()} problem(s):\n{problems}") from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: invalid YAML ({problem}); check indentation and quoting there") from None
    if data is None:
        raise ConfigError(f"{path} is empty; it needs at least `data:` and `methods:`")
    return data


def _apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to ``tree``; list items are addressed by index or method name."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not KEY=VALUE, e.g. --set training.epochs=1")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, key)
            if last:
                node[index] = value
            else:
                if isinstance(node[index], str):  # `methods: [lora]` shorthand: expand to edit it
                    node[index] = {"method": node[index]}
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")


def _list_index(items: list[Any], part: str, key: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if -len(items) <= index < len(items):
            return index
        raise ConfigError(f"override {key!r}: index {part} is out of range (the list has {len(items)} items)")
    for index, entry in enumerate(items):
        name = entry if isinstance(entry, str) else (entry.get("name") or entry.get("method"))
        if name == part:
            return index
    names = [e if isinstance(e, str) else (e.get("name") or e.get("method")) for e in items]
    raise ConfigError(f"override {key!r}: no list item named {part!r}; items are {names}")


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> None:
    """Make data/model paths relative to the config file, as users expect from a config next to its data."""
    data = tree.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("path"), str):
            data["path"] = _resolve(data["path"], base)
        splits = data.get("splits")
        if isinstance(splits, dict):
            for split, value in splits.items():
                if isinstance(value, str):
                    splits[split] = _resolve(value, base)
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = _resolve(model["path"], base, only_if_exists=True)


def _resolve(value: str, base: Path, only_if_exists: bool = False) -> str:
    if value.startswith("shipped:") or Path(value).is_absolute():
        return value
    candidate = (base / value).resolve()
    if only_if_exists and not candidate.exists():
        return value  # an alias or a hub id, not a relative folder
    if not candidate.exists() and Path(value).exists():
        return str(Path(value).resolve())  # relative to the working directory instead
    return str(candidate)


def _describe(err: Any) -> str:
    """One line per pydantic error: dotted key, what is wrong, and a suggestion."""
    loc = [str(part) for part in err["loc"]]
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        allowed = _allowed_keys(err["loc"][:-1])
        hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        where = ".".join(parent) or "top level"
        return f"{'.'.join(loc)}: unknown key in {where}{suggestion} (allowed: {', '.join(sorted(allowed))})"
    if kind == "union_tag_invalid":
        given = str(err["input"].get("method"))
        hint = difflib.get_close_matches(given, [m.value for m in MethodName], n=1)
        guess = f" (did you mean {hint[0]!r}?)" if hint else ""
        return (f"{'.'.join(loc)}: unknown method {given!r}{guess}; "
                f"choose one of {', '.join(m.value for m in MethodName)} (see `peftlab methods`)")
    if kind == "union_tag_not_found":
        return f"{'.'.join(loc)}: each method needs `method:` (one of {', '.join(m.value for m in MethodName)})"
    message = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or kind == "missing" else f" (got {got!r})"
    return f"{'.'.join(loc) or 'config'}: {message}{shown}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at ``loc`` in the config tree, for 'did you mean' hints."""
    model: Any = ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(part, str) and part in METHOD_CONFIGS and model is _MethodBase:
            model = METHOD_CONFIGS[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
    return list(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside an annotation such as ``X | None`` or ``list[Union[...]]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = typing.get_args(annotation)
    for arg in args:
        found = _model_in(arg)
        if found is not None:
            return _MethodBase if found in METHOD_CONFIGS.values() else found
    return None


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML, saved beside every run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
