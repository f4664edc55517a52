"""The PEFT adapters served over one base model, one of them active per batch."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from rag.generation import GenerationError


class AdapterSet:
    """The base model plus PEFT adapters, one of which is active per batch.

    PEFT keeps one adapter type per ``PeftModel``, so adapters are grouped by
    type, each group one ``PeftModel`` over the *same* base (weights are never
    copied). Injected adapters (LoRA, ...) live inside the base's layers and
    are switched off while another group or the bare base runs; prompt
    learning (prefix tuning, P-Tuning v2, prompt tuning) wraps the forward
    pass and touches no layer. At most one injected type can be served.
    """

    def __init__(self, base, adapters: dict[str, str | Path]) -> None:
        from peft import PeftConfig

        self.base = base
        self.input_device = base.get_input_embeddings().weight.device
        self._groups: dict[str, Any] = {}  # peft type -> PeftModel
        self._group_of: dict[str, str] = {}  # adapter name -> peft type
        configs = {name: PeftConfig.from_pretrained(str(folder)) for name, folder in adapters.items()}
        injected = {str(c.peft_type) for c in configs.values() if not c.is_prompt_learning}
        if len(injected) > 1:
            raise GenerationError(f"adapters of several layer-injecting types cannot share a base: {sorted(injected)}")
        # Injected types first: prompt-learning wrappers then see the final layers.
        for name in sorted(configs, key=lambda n: configs[n].is_prompt_learning):
            self._load(name, Path(adapters[name]), configs[name])
        self.names: tuple[str, ...] = tuple(adapters)

    def _load(self, name: str, folder: Path, config) -> None:
        from peft import PeftModel

        kind = str(config.peft_type)
        if kind in self._groups:
            self._groups[kind].load_adapter(str(folder), adapter_name=name, is_trainable=False)
        else:
            self._groups[kind] = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name, is_trainable=False)
        self._groups[kind].eval()
        self._group_of[name] = kind

    @contextlib.contextmanager
    def activated(self, adapter: str | None) -> Iterator[Any]:
        """The model to run with ``adapter`` active (None: the bare base)."""
        wanted = self._group_of.get(adapter) if adapter else None
        with contextlib.ExitStack() as stack:
            for kind, peft_model in self._groups.items():
                if kind != wanted and not peft_model.peft_config[peft_model.active_adapter].is_prompt_learning:
                    stack.enter_context(peft_model.disable_adapter())
            if wanted is None:
                yield self.base
            else:
                peft_model = self._groups[wanted]
                peft_model.set_adapter(adapter)
                yield peft_model
