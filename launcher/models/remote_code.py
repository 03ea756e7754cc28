"""Loading a model's own (remote) code on the installed transformers, without editing its files.

The quirks registry (launcher.config.quirks) says, per model_type, what that code needs; this module
applies it at load time: config attributes transformers 5 no longer provides, a model class that
can generate (GenerationMixin) and runs post_init(), and a tokenizer class whose constructor and
_pad() fit transformers 5's calls. Each adapted class is a subclass made here, with the remote
class's own name and module, so nothing a user downloaded is changed and save_pretrained still
writes the remote code's auto_map.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from functools import cache
from pathlib import Path

from launcher.config.quirks import KNOWN_REVISIONS, Quirks, quirks_for


def config_json(name_or_path: str, revision: str | None = None) -> dict:
    """The model's config.json as written (keys transformers drops included); {} when unreachable."""
    return model_json(name_or_path, "config.json", revision)


def model_json(name_or_path: str, filename: str, revision: str | None = None) -> dict:
    """A JSON file of the model (local dir, or the hub through its cache); {} when it cannot be had."""
    local = Path(name_or_path) / filename
    if local.is_file():
        return json.loads(local.read_text())
    return hub_json(name_or_path, filename, revision)


@cache  # one answer per process: an unreachable hub costs ~25 s of retries per question
def hub_json(name_or_path: str, filename: str, revision: str | None) -> dict:
    try:
        from transformers.utils import cached_file

        return json.loads(Path(cached_file(name_or_path, filename, revision=revision)).read_text())
    except Exception:
        return {}


def require_config(name_or_path: str, revision: str | None = None) -> None:
    """Raise at once (OSError) when the model's config.json could not be had: nothing else of it can."""
    if not Path(name_or_path).exists() and not config_json(name_or_path, revision):
        raise OSError(f"config.json of {name_or_path} (revision {revision}) cannot be fetched: no local copy, hub unreachable")


def load_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """AutoConfig, with the attributes the model's code reads and transformers 5 no longer sets."""
    from transformers import AutoConfig

    require_config(name_or_path, revision)
    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    repair_config(config, quirks_for(getattr(config, "model_type", None)), config_json(name_or_path, revision))
    return config


def repair_config(config, quirks: Quirks, written: dict) -> None:
    for key, default in quirks.config_kept.items():  # dropped by PretrainedConfig: the file's value
        if getattr(config, key, None) is None:
            setattr(config, key, written.get(key, default))


def remote_class(auto_map: dict | None, auto_name: str, name_or_path: str, revision: str | None):
    """The class an auto_map names for `auto_name`, or None when it names none."""
    reference = (auto_map or {}).get(auto_name)
    if isinstance(reference, (list, tuple)):
        reference = reference[0]
    if not reference:
        return None
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(reference, name_or_path, revision=revision)


def model_class(config, name_or_path: str, revision: str | None, trust_remote_code: bool):
    """The causal-LM class to load: the remote class adapted as the registry says, or None for the
    Auto class (no remote code, or nothing to repair)."""
    quirks = quirks_for(getattr(config, "model_type", None))
    if not trust_remote_code or not quirks.remote_code:
        return None
    cls = remote_class(getattr(config, "auto_map", None), "AutoModelForCausalLM", name_or_path, revision)
    return None if cls is None else adapted_model_class(cls, config.model_type)


@cache
def adapted_model_class(cls, model_type: str):
    from transformers import GenerationMixin

    quirks = quirks_for(model_type)
    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    if quirks.call_post_init or quirks.config_aliases:

        def __init__(self, config, *args, **kwargs):
            aliases = {k: getattr(config, v) for k, v in quirks.config_aliases.items() if not hasattr(config, k)}
            for key, value in aliases.items():  # read by its __init__ only; a saved config must not keep them
                setattr(config, key, value)
            try:
                cls.__init__(self, config, *args, **kwargs)
            finally:
                for key in aliases:
                    delattr(config, key)
            if quirks.call_post_init and not hasattr(self, "all_tied_weights_keys"):
                self.post_init()

        namespace["__init__"] = __init__
    needs_mixin = quirks.generation_mixin and not issubclass(cls, GenerationMixin)
    return type(cls.__name__, (cls, GenerationMixin) if needs_mixin else (cls,), namespace)


def tokenizer_class(name_or_path: str, revision: str | None, trust_remote_code: bool, model_type: str | None):
    """The tokenizer class to load, adapted as the registry says; None for AutoTokenizer."""
    quirks = quirks_for(model_type)
    repairs = quirks.tokenizer_prebuilds or quirks.pad_drops_padding_side or quirks.role_tokens
    if not trust_remote_code or not quirks.remote_code or not repairs:
        return None
    cls = remote_class(
        model_json(name_or_path, "tokenizer_config.json", revision).get("auto_map"), "AutoTokenizer", name_or_path, revision
    )
    return None if cls is None else adapted_tokenizer_class(cls, model_type)


@cache
def adapted_tokenizer_class(cls, model_type: str):
    quirks = quirks_for(model_type)
    module = inspect.getmodule(cls)
    namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    if quirks.tokenizer_prebuilds:
        attribute, builder_name = quirks.tokenizer_prebuilds

        def __init__(self, vocab_file, *args, **kwargs):
            # transformers 5's constructor already asks for the vocabulary, which this attribute holds
            setattr(self, attribute, getattr(module, builder_name)(vocab_file))
            cls.__init__(self, vocab_file, *args, **kwargs)

        namespace["__init__"] = __init__
    if quirks.role_tokens:

        def _tokenize(self, text, **kwargs):
            unknown = cls._convert_token_to_id(self, self.unk_token)
            known = [m for m in quirks.role_tokens if cls._convert_token_to_id(self, m) != unknown]
            if not known:
                return cls._tokenize(self, text, **kwargs)
            patterns = ["(?<=\\[gMASK\\])sop" if m == "sop" else re.escape(m) for m in known]
            pieces, after_role = [], False
            for part in re.split("(" + "|".join(patterns) + ")", text):
                if part in known:
                    pieces.append(part)
                    after_role = part.startswith("<|")
                    continue
                if after_role and "\n" in part:  # the role's metadata line, encoded apart
                    line, part = part.split("\n", 1)
                    pieces += cls._tokenize(self, line + "\n")
                pieces += cls._tokenize(self, part) if part else []
                after_role = False
            return pieces

        namespace["_tokenize"] = _tokenize
    if quirks.pad_drops_padding_side:

        def _pad(self, encoded_inputs, *args, padding_side=None, **kwargs):
            if padding_side not in (None, self.padding_side):
                raise ValueError(f"{cls.__name__} pads on the {self.padding_side} only, not the {padding_side}")
            return cls._pad(self, encoded_inputs, *args, **kwargs)

        namespace["_pad"] = _pad
    return type(cls.__name__, (cls,), namespace)


def code_fingerprint(cls) -> tuple[str, str] | None:
    """(file name, first 16 hex digits of its sha256) of the file a remote class comes from."""
    try:
        path = Path(inspect.getfile(cls))
    except (TypeError, OSError):
        return None
    return path.name, hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def unknown_revision(model_type: str | None, classes: list) -> str | None:
    """A warning when the remote code is not a revision the registry was tested with."""
    known = KNOWN_REVISIONS.get(model_type or "")
    if known is None:
        return None
    for cls in classes:
        fingerprint = code_fingerprint(cls)
        if fingerprint and fingerprint[1] not in known:
            names = ", ".join(f"{name} ({digest})" for digest, name in known.items())
            return (
                f"model: {fingerprint[0]} of this {model_type} model is a revision the quirks registry was not tested "
                f"with (sha256 {fingerprint[1]}; tested: {names}); its repairs are applied as for those"
            )
    return None
