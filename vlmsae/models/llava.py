"""LLaVA: load real weights, build a tiny random one offline, and find the vision-tower blocks.

METHOD §5 steers ``llava-hf/llava-1.5-7b-hf`` through an SAE trained on block 22 of its CLIP
ViT-L/14-336 vision tower (``vision_feature_layer=-2``). This module is the only place that knows
how transformers lays LLaVA out, so the steering hooks (``vlmsae.steering``) and the extraction
backend (``vlmsae.extract``, backend ``hf_llava``) work across transformers 4.4x (``model.vision_tower
.vision_model.encoder.layers``) and 5.x (``model.model.vision_tower.encoder.layers``).

The tiny model is built from configs with a fixed seed, saved with ``save_pretrained`` and read back
with the same ``from_pretrained`` call real weights take, processor included: its tokenizer is a
small word-level vocabulary built locally, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmsae.models.hub import offline_reason
from vlmsae.models.tap import resolve_device, torch_dtype
from vlmsae.models.tiny import build_folder, tiny_hf_vision_parts, tiny_model_dpath

LLAVA_15_7B = "llava-hf/llava-1.5-7b-hf"

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), written for the
# ``apply_chat_template`` message format (content = list of {"type": "image"|"text"} items).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}\n{% else %}"
    "{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ ' ' if message['role'] == 'user' else '</s> ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The tiny tokenizer's vocabulary: the chat-template words, the steering prompt, and a few
# dozen concrete nouns so a random model can "answer" with a word a CLIP text tower can embed.
_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_WORDS = """
user assistant : ? ! . , ' " - what is shown in this image use exactly one word write me a short
love poem the of and to it you i my your with for on at by from as are be was that there here
describe picture photo colour color white black red green blue yellow big small cat dog bird fish
horse cow sheep goat lion tiger bear wolf fox rabbit mouse snake frog turtle shark whale dolphin owl
eagle parrot duck chicken insect bee butterfly spider ant flower tree leaf grass forest mountain
river lake sea ocean beach sky cloud sun moon star snow rain car truck bus train plane boat bicycle
house building bridge road street city church castle chair table bed lamp clock cup bottle book
pencil pen paper phone computer keyboard camera guitar piano ball hat shoe shirt dress bag umbrella
pizza banana apple orange bread cake coffee rocket robot person man woman child face hand astronaut
coin
"""


def build_tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` built in memory: no download, deterministic ids.

    ``<image>`` is a special token, so the processor can expand it into one placeholder per patch
    and LLaVA can find those placeholders by id.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in _SPECIAL_TOKENS + _WORDS.split():
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Replace("\n", " "), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",  # decoder-only batched generation pads on the left
        model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def _is_complete(dpath: Path) -> bool:
    """A saved LLaVA folder: model config + weights + tokenizer (the temp-then-rename write makes it whole)."""
    return (dpath / "config.json").exists() and (dpath / "tokenizer.json").exists() and any(dpath.glob("*.safetensors"))


def llava_parts(
    tokenizer: Any,
    text_config: Any,
    chat_template: str,
    image_size: int,
    patch_size: int,
    vision_width: int,
    vision_layers: int,
    vision_feature_layer: int,
) -> tuple[Any, Any]:
    """``(LlavaProcessor, LlavaConfig)`` of a LLaVA-1.5-shaped model with a tiny random CLIP tower around the
    language model ``text_config`` (``<image>`` must be in ``tokenizer``); :func:`build_tiny_llava` and the
    tests' LLaVA around a real language model share it."""
    from transformers import LlavaConfig, LlavaProcessor

    vision_config, image_processor = tiny_hf_vision_parts(
        image_size, patch_size, vision_width, vision_layers, heads=4, projection_dim=vision_width
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        num_additional_image_tokens=1,  # CLIP's CLS
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",  # drop CLS, as LLaVA-1.5
        projector_hidden_act="gelu",
    )
    return processor, config


def build_tiny_llava(
    dpath: str | Path,
    seed: int = 0,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_width: int = 32,
    vision_layers: int = 4,
    text_width: int = 32,
    text_layers: int = 2,
    vision_feature_layer: int = -2,
    max_shard_size: str | int | None = None,
) -> Path:
    """Build a tiny random ``LlavaForConditionalGeneration`` + offline processor and save both to ``dpath``.

    Same shape of model as LLaVA-1.5 (CLIP vision tower, two-layer GELU projector, Llama text
    model, ``vision_feature_layer=-2``, CLS dropped), only small: 32 px images with 8 px patches
    give 16 patch tokens + CLS. Load it back with :func:`load_llava` (``from_pretrained``).
    Idempotent: an existing complete folder is left as is (:func:`~vlmsae.models.tiny.build_folder` writes it
    whole). ``max_shard_size`` (e.g. ``"100KB"``) writes shards + ``model.safetensors.index.json``, the layout of
    the Hub's 7B checkpoint.
    """
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    dpath = Path(dpath)
    if _is_complete(dpath):
        return dpath
    tokenizer = build_tiny_tokenizer()
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=text_width * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor, config = llava_parts(
        tokenizer,
        text_config,
        LLAVA_CHAT_TEMPLATE,
        image_size,
        patch_size,
        vision_width,
        vision_layers,
        vision_feature_layer,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    return build_folder(dpath, lambda tmp: (model.save_pretrained(tmp, **shards), processor.save_pretrained(tmp)))


def dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before (same meaning)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _repo_or_dir_kwargs(
    name_or_path: str | Path, cache_dir: str | Path | None, local_files_only: bool | None
) -> tuple[str, bool, dict[str, Any]]:
    """``(repo_or_dir, is_dir, from_pretrained kwargs)``, ``repo_or_dir`` a HF repo id or a local folder: a folder
    is read offline; a HF id is offline only if ``HF_HUB_OFFLINE`` is set, the Hub is unreachable
    (:mod:`vlmsae.models.hub`) or ``local_files_only`` says so."""
    repo_or_dir = str(name_or_path)
    is_dir = Path(repo_or_dir).expanduser().is_dir()
    if is_dir:
        repo_or_dir = str(Path(repo_or_dir).expanduser())
    if local_files_only is None:
        local_files_only = is_dir or offline_reason() is not None  # HF_HUB_OFFLINE, or no Hub within seconds
    kwargs: dict[str, Any] = {
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "local_files_only": bool(local_files_only),
    }
    return repo_or_dir, is_dir, kwargs


def _load_error(repo_or_dir: str, is_dir: bool, local_files_only: Any, cache_dir: Any, err: Exception) -> OSError:
    if is_dir:
        return OSError(
            f"Could not load LLaVA from the local folder {repo_or_dir!r}: {err}\nThe folder must hold what "
            "save_pretrained writes (config.json, model weights, processor and tokenizer files)."
        )
    return OSError(
        f"Could not load LLaVA {repo_or_dir!r} (local_files_only={local_files_only}, cache_dir={cache_dir}): "
        f"{err}\nThis machine may be offline and the model not cached. Either download it where there is "
        f"internet (`huggingface-cli download {repo_or_dir} --local-dir <folder>`) and pass the folder, e.g. "
        f"`model.local_path=<folder>` (or load_llava('<folder>')), or point `cache_dir`/HF_HOME at a cache "
        "that already holds it."
    )


def load_llava(
    name_or_path: str | Path = LLAVA_15_7B,
    dtype: str | torch.dtype = "float16",
    device_map: str | dict | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
):
    """Load ``(LlavaForConditionalGeneration, LlavaProcessor)`` from a HF id or a local folder.

    ``dtype``: float16 (the paper) or bfloat16 halve memory (a 7B model needs ~14 GB);
    float32 for CPU tests. ``device_map``: ``"auto"`` spreads layers over the visible GPUs (and
    CPU) with accelerate; ``None`` loads on CPU (move it with ``.to``); ``"cuda:0"`` puts it on
    one GPU. ``local_files_only``: None = only if ``HF_HUB_OFFLINE`` is set or the path is a folder.
    The tokenizer pads on the left, as batched generation with a decoder-only model needs.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    repo_or_dir, is_dir, kwargs = _repo_or_dir_kwargs(name_or_path, cache_dir, local_files_only)
    local_files_only = kwargs["local_files_only"]
    dtype = torch_dtype(dtype)  # a bad dtype is the caller's error, not a loading failure
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            repo_or_dir, device_map=device_map, **dtype_kwarg(dtype), **kwargs
        )
        processor = AutoProcessor.from_pretrained(repo_or_dir, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(repo_or_dir, is_dir, local_files_only, cache_dir, err) from err
    model.eval()
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:  # some checkpoints ship without one; generation needs it
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


# Where the vision tower's tensors live in a LLaVA checkpoint. Hub checkpoints written by transformers 4.x
# (llava-hf/llava-1.5-7b-hf): ``vision_tower.vision_model.<...>``; 5.x ``save_pretrained`` (the tiny LLaVA):
# ``vision_tower.<...>`` (its CLIPVisionModel has no ``vision_model`` wrapper); an unconverted 5.x state dict:
# ``model.vision_tower.<...>``. Everything else (language model, projector) is never read by the tap.
VISION_KEY_PREFIXES = ("model.vision_tower.", "vision_tower.")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def _strip_vision_model(key: str) -> str:
    return key[len("vision_model.") :] if key.startswith("vision_model.") else key


def vision_key(key: str) -> str | None:
    """A LLaVA checkpoint key -> the vision tower's own key without its ``vision_model.`` wrapper
    (``vision_tower.vision_model.encoder.layers.0.x`` -> ``encoder.layers.0.x``); None for any other key."""
    for prefix in VISION_KEY_PREFIXES:
        if key.startswith(prefix):
            return _strip_vision_model(key[len(prefix) :])
    return None


def _checkpoint_file(repo_or_dir: str, is_dir: bool, filename: str, kwargs: dict[str, Any]) -> Path | None:
    """``filename`` of a folder or a HF repo (downloaded/cached on demand); None when the repo has no such file."""
    if is_dir:
        fpath = Path(repo_or_dir) / filename
        return fpath if fpath.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(repo_or_dir, filename, _raise_exceptions_for_missing_entries=False, **kwargs)
    return None if found is None else Path(found)


def vision_tensor_files(
    name_or_path: str | Path, cache_dir: str | Path | None = None, local_files_only: bool | None = None
) -> dict[Path, list[str]]:
    """``{safetensors file: [vision-tower keys in it]}`` for a LLaVA checkpoint (folder or HF id).

    A sharded checkpoint is resolved through its index's ``weight_map``, so only the shards that hold
    vision-tower tensors are opened (and, for a HF id, downloaded). Only safetensors are read: a
    ``pytorch_model.bin`` checkpoint would have to be unpickled, which vlmsae never does.
    """
    import json

    repo_or_dir, is_dir, kwargs = _repo_or_dir_kwargs(name_or_path, cache_dir, local_files_only)
    files: dict[Path, list[str]] = {}
    index_fpath = _checkpoint_file(repo_or_dir, is_dir, SAFETENSORS_INDEX, kwargs)
    if index_fpath is not None:
        weight_map = json.loads(index_fpath.read_text()).get("weight_map") or {}
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if vision_key(key) is not None:
                by_shard.setdefault(shard, []).append(key)
        for shard, keys in sorted(by_shard.items()):
            fpath = _checkpoint_file(repo_or_dir, is_dir, shard, kwargs)
            if fpath is None:
                raise FileNotFoundError(
                    f"{repo_or_dir!r}: {SAFETENSORS_INDEX} names the shard {shard!r}, which is missing."
                )
            files[fpath] = keys
    else:
        fpath = _checkpoint_file(repo_or_dir, is_dir, SAFETENSORS_SINGLE, kwargs)
        if fpath is None:
            raise FileNotFoundError(
                f"{repo_or_dir!r} has neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE}: the vision tower is read "
                "from safetensors only (pytorch_model.bin is never unpickled). Convert the checkpoint with "
                "`save_pretrained(..., safe_serialization=True)` or use a safetensors release."
            )
        import safetensors

        with safetensors.safe_open(str(fpath), framework="pt") as handle:
            files[fpath] = [key for key in handle.keys() if vision_key(key) is not None]  # noqa: SIM118 (not iterable)
    if not any(files.values()):
        raise ValueError(
            f"{repo_or_dir!r} holds no vision-tower tensors (keys starting with {' or '.join(VISION_KEY_PREFIXES)}): "
            "is it a LLaVA checkpoint?"
        )
    return files


def load_llava_vision_tower(
    name_or_path: str | Path = LLAVA_15_7B,
    dtype: str | torch.dtype = "float16",
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
):
    """``(vision tower, image processor)`` of a LLaVA checkpoint, without the language model or projector.

    The tower is built from the LLaVA config's ``vision_config`` as LLaVA builds it
    (``AutoModel.from_config``: a CLIPVisionModel for LLaVA-1.5) and filled with the ``vision_tower``
    tensors only, read one by one with ``safetensors.safe_open`` from the shards that hold them: for
    LLaVA-1.5-7B that is ~0.6 GB (fp16) instead of the ~14 GB :func:`load_llava` materialises.
    Extraction (backend ``hf_llava``) uses this; steering needs the whole model (:func:`load_llava`).
    The tower is on CPU in ``dtype`` (move it with ``.to``).
    """
    import safetensors
    from transformers import AutoConfig, AutoModel, AutoProcessor

    dtype = torch_dtype(dtype)
    repo_or_dir, is_dir, kwargs = _repo_or_dir_kwargs(name_or_path, cache_dir, local_files_only)
    try:
        config = AutoConfig.from_pretrained(repo_or_dir, **kwargs)
        image_processor = AutoProcessor.from_pretrained(repo_or_dir, **kwargs).image_processor
    except (OSError, ValueError) as err:
        raise _load_error(repo_or_dir, is_dir, kwargs["local_files_only"], cache_dir, err) from err
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        raise ValueError(
            f"{repo_or_dir!r} has no vision_config in its config.json ({type(config).__name__}): not a LLaVA."
        )
    files = vision_tensor_files(repo_or_dir, cache_dir, kwargs["local_files_only"])
    try:  # the weights are overwritten right below: skip the random init (seconds for a ViT-L on CPU)
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        tower = AutoModel.from_config(vision_config)
    own_key = {_strip_vision_model(key): key for key in tower.state_dict()}
    buffers = {_strip_vision_model(name) for name, _ in tower.named_buffers()}
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for fpath, keys in files.items():
        with safetensors.safe_open(str(fpath), framework="pt") as handle:
            for key in keys:
                name = vision_key(key)
                if name in own_key:
                    state[own_key[name]] = handle.get_tensor(key).to(dtype)
                elif name not in buffers:  # old checkpoints store non-persistent buffers (position_ids): skip
                    unexpected.append(key)
    missing = sorted(set(own_key.values()) - set(state))
    if missing or unexpected:
        raise ValueError(
            f"The vision-tower tensors of {repo_or_dir!r} do not fit the {type(tower).__name__} its vision_config "
            f"builds: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Is the checkpoint a LLaVA "
            "(llava-hf layout) whose config.json matches its weights?"
        )
    tower.load_state_dict(state, strict=True, assign=True)  # assign: no second copy of the weights
    return tower.to(dtype).eval(), image_processor


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder of a LLaVA model (``...vision_tower``), whatever the transformers version."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "vision_tower":
            return module
    raise ValueError(
        f"No vision tower in {type(model).__name__}: expected a submodule named 'vision_tower' "
        "(LlavaForConditionalGeneration and its relatives have one)."
    )


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of the vision encoder's transformer blocks, found by module name.

    transformers 5.x: ``model.model.vision_tower.encoder.layers``; 4.4x:
    ``model.vision_tower.vision_model.encoder.layers`` (or under ``model.model``). Also accepts a bare
    vision tower (CLIPVisionModel / SiglipVisionModel).
    """
    try:
        tower = vision_tower(model)
    except ValueError:
        tower = model
    candidates = [
        (name, module)
        for name, module in tower.named_modules()
        if isinstance(module, nn.ModuleList) and name.endswith("encoder.layers")
    ]
    if len(candidates) == 1:
        return candidates[0][1]
    if not candidates:  # unknown layout: the longest ModuleList is the block stack
        lists = [m for _, m in tower.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if lists:
            return max(lists, key=len)
    names = [name for name, _ in candidates]
    raise ValueError(
        f"Cannot find the vision encoder blocks of {type(model).__name__}: expected exactly one "
        f"ModuleList named '*encoder.layers' under the vision tower, found {names or 'none'}."
    )


def tapped_block_index(model: nn.Module) -> int:
    """The 0-indexed vision block whose output LLaVA projects (METHOD §1, 5).

    ``hidden_states[0]`` is the embedding output and ``hidden_states[L+1]`` the output of block L,
    so ``vision_feature_layer=-2`` on 24 blocks is ``hidden_states[23]`` = block 22.
    """
    layer = getattr(getattr(model, "config", None), "vision_feature_layer", None)
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no config.vision_feature_layer: is it a LLaVA model?")
    if not isinstance(layer, int):
        raise ValueError(
            f"vision_feature_layer={layer!r} concatenates several layers; steering supports a single tapped layer."
        )
    n_blocks = len(vision_blocks(model))
    n_states = n_blocks + 1
    if not -n_states <= layer < n_states:
        raise ValueError(f"vision_feature_layer={layer} is out of range for a vision tower with {n_blocks} blocks.")
    block = layer % n_states - 1
    if block < 0:
        raise ValueError(
            f"vision_feature_layer={layer} selects the embedding output (hidden_states[0]), not a block output."
        )
    return block


def load_llava_spec(spec: Any):
    """``(model, processor)`` for a model config node / ``ModelSpec`` with ``backend: hf_llava``.

    Reads ``name``, ``pretrained`` (HF id), ``local_path`` (takes precedence), ``cache_dir``,
    ``dtype``, ``device``, ``device_map`` and ``local_files_only``. ``tiny: true`` builds the tiny random LLaVA
    once under ``$VLMSAE_HOME/models/<name>`` (seed ``seed``, default 0) and loads it from there.
    Without a ``device_map`` the model is moved to ``device``.
    """
    get = spec.get if isinstance(spec, dict) else (lambda key, default=None: getattr(spec, key, default))
    backend = get("backend", "hf_llava")
    if backend != "hf_llava":
        raise ValueError(
            f"model.backend={backend!r}: steering needs a LLaVA model (backend hf_llava, e.g. model=llava15_7b)."
        )
    if get("tiny", False):
        repo_or_dir: str | Path = get("local_path", None) or build_tiny_llava(
            tiny_model_dpath(str(get("name", "tiny_llava")), int(get("seed", 0))), seed=int(get("seed", 0))
        )
    else:
        repo_or_dir = get("local_path", None) or get("pretrained", None) or LLAVA_15_7B
    device_map = get("device_map", None)
    model, processor = load_llava(
        repo_or_dir,
        dtype=get("dtype", "float16"),
        device_map=device_map,
        cache_dir=get("cache_dir", None),
        local_files_only=get("local_files_only", None),
    )
    if device_map is None:
        model.to(resolve_device(get("device", "auto")))
    return model, processor
