"""`load_model`: a Hugging Face model directory (config.json + *.safetensors) into `LlamaForCausalLM`."""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from phasesplit.engine.config import ModelConfig
from phasesplit.engine.model import LlamaForCausalLM
from phasesplit.engine.parallel import TensorParallel
from phasesplit.transport.layout import DTYPES

DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
INDEX_FILE = "model.safetensors.index.json"


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig | None = None) -> torch.dtype:
    """A dtype setting (name, torch.dtype, or None for the checkpoint's own) as a torch.dtype."""
    if dtype is None or dtype == "auto":
        dtype = config.torch_dtype if config is not None else "float32"
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use float32, bfloat16 or float16")
    return DTYPES[name]


def weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (one file, or several with an index)."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: missing field 'weight_map'")
        files = {name: model_dir / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise FileNotFoundError(f"safetensors file {path.name} listed in {INDEX_FILE} not found in {model_dir}")
        return files
    paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors weights found in model directory {model_dir}")
    files = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            files.update({name: path for name in f.keys()})
    return files


def load_model(model_dir, dtype: str | torch.dtype | None = None, device="cpu",
               tp: TensorParallel = TensorParallel()) -> tuple[ModelConfig, LlamaForCausalLM]:
    """The model, or with `tp` this rank's shard of it: only the slices it holds are read from disk."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found")
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, tp)
        whole = dict(LlamaForCausalLM(config).named_parameters())  # the checkpoint's shapes
    tied = config.tie_word_embeddings
    # tensor name in the model -> its name in the checkpoint (a tied LM head is read from the embedding)
    sources = {name: "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
               for name, _ in model.named_parameters()}
    missing = [name for name in whole if name not in files]
    if missing:
        raise ValueError(f"tensor {missing[0]!r} missing from the weights in {model_dir} ({len(missing)} missing)")
    ignorable = {"lm_head.weight"} if tied else set()
    unexpected = [n for n in files if n not in whole and n not in ignorable and not n.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise ValueError(
            f"tensor {unexpected[0]!r} in the weights in {model_dir} has no place in a {config.architecture} with "
            f"this config.json ({len(unexpected)} unexpected)"
        )
    by_file: dict[Path, list[str]] = {}
    for name, source in sources.items():
        by_file.setdefault(files[source], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                tensor = _read_shard(f, path, sources[name], whole[sources[name]].shape, model.shard.weight_slice(
                    name, config.head_dim))
                _set_parameter(model, name, tensor.to(device=device, dtype=torch_dtype))
    if tied and tp.size == 1:
        model.lm_head.weight = model.model.embed_tokens.weight
    return config, model.eval()


def _read_shard(f, path: Path, name: str, shape: torch.Size, part: tuple[int, range] | None) -> torch.Tensor:
    """Tensor `name` (which must have `shape`), or only its range `part` = (dimension, range)."""
    view = f.get_slice(name)
    if tuple(view.get_shape()) != tuple(shape):
        raise ValueError(f"tensor {name!r} in {path.name} has shape {tuple(view.get_shape())}, "
                         f"the config needs {tuple(shape)}")
    if part is None:
        return view[:]
    dim, rows = part
    index = (slice(None),) * dim + (slice(rows.start, rows.stop),)
    return view[index]


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    setattr(model.get_submodule(module_name), param_name, nn.Parameter(tensor, requires_grad=False))
