"""transformers' own common model tests, run against libmoe's transformers classes the way
transformers tests its in-tree MoE models (tests/models/qwen2_moe: a CausalLMModelTester naming
the classes, a CausalLMModelTest with ModelTesterMixin and GenerationTesterMixin).

transformers' tests are not in its wheel. `python tests/fetch_transformers_tests.py` (in the
README's test line) extracts the common ones its PyPI sdist ships (ModelTesterMixin, ConfigTester)
into .transformers-tests/<version>/; GenerationTesterMixin and CausalLMModelTest are not in the
sdist, so with those files alone the model tests run from ModelTesterMixin with a tester written
here, and the generation ones are covered by tests/models/test_hf_decoding.py. With
LIBMOE_TRANSFORMERS_TESTS pointing at the tests/ folder of a transformers checkout of the installed
version, the whole CausalLMModelTest runs (docs/transformers.md). Without either, the module is
skipped and says why.

Skips are listed in SKIPS, each with its reason: features an MoE research model honestly lacks.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import unittest
from importlib.metadata import version
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("parameterized")

from libmoe.models.hf import LibMoEConfig, LibMoEForCausalLM, LibMoEModel  # noqa: E402

# transformers' tests/ is imported as the package `tests`, as transformers runs it (its generation
# tests import `tests.exporters` absolutely); libmoe's own tests never import `tests.`, but when
# something already holds that name it becomes `transformers_tests`.
PACKAGE = "tests" if "tests" not in sys.modules else "transformers_tests"
ROOT = Path(__file__).resolve().parents[2]


def _tests_dir() -> Path | None:
    given = os.environ.get("LIBMOE_TRANSFORMERS_TESTS")
    if given:
        path = Path(given)
        if not (path / "test_modeling_common.py").is_file():
            raise RuntimeError(f"LIBMOE_TRANSFORMERS_TESTS={given} has no test_modeling_common.py: "
                               "point it at the tests/ folder of a transformers checkout.")
        return path
    fetched = ROOT / ".transformers-tests" / version("transformers") / "tests"
    return fetched if (fetched / "test_modeling_common.py").is_file() else None


# Non-default values of PretrainedConfig's own arguments, which ConfigTester checks a config passes
# through (transformers' list is in tests/utils/test_configuration_utils.py, not in the sdist).
COMMON_CONFIG_KWARGS = {"return_dict": False, "output_hidden_states": True, "dtype": "float16",
                        "tie_word_embeddings": True, "chunk_size_feed_forward": 5,
                        "is_encoder_decoder": True, "problem_type": "regression",
                        "id2label": {0: "yes", 1: "no"}, "label2id": {"yes": 0, "no": 1}}
# Modules of transformers' tests/ that the sdist lacks, as stand-ins that let the others import:
# mixins without tests (the generation tests then come from tests/models/test_hf_decoding.py).
STAND_INS = {"generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
             "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
             "utils.test_configuration_utils": {"config_common_kwargs": COMMON_CONFIG_KWARGS}}


def _import_transformers_tests(path: Path) -> dict[str, types.ModuleType | None]:
    """transformers' tests/ as package PACKAGE, with STAND_INS for the modules it lacks."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
        for name, attributes in STAND_INS.items():
            if not (path / (name.replace(".", "/") + ".py")).is_file():
                parent = f"{PACKAGE}.{name.split('.')[0]}"
                sys.modules.setdefault(parent, types.ModuleType(parent))
                stand_in = types.ModuleType(f"{PACKAGE}.{name}")
                stand_in.__dict__.update(attributes)
                sys.modules[f"{PACKAGE}.{name}"] = stand_in
    modules: dict[str, types.ModuleType | None] = {}
    for name in ("test_modeling_common", "test_configuration_common", "causal_lm_tester"):
        has_file = (path / f"{name}.py").is_file()
        modules[name] = importlib.import_module(f"{PACKAGE}.{name}") if has_file else None
    modules["generation"] = (sys.modules[f"{PACKAGE}.generation.test_utils"]
                             if (path / "generation" / "test_utils.py").is_file() else None)
    return modules


TESTS_DIR = _tests_dir()
if TESTS_DIR is None:
    pytest.skip(f"transformers {version('transformers')}'s common tests are not here: run "
                "`python tests/fetch_transformers_tests.py` (or set LIBMOE_TRANSFORMERS_TESTS to a "
                "transformers checkout's tests/)", allow_module_level=True)
MODULES = _import_transformers_tests(TESTS_DIR)
common = MODULES["test_modeling_common"]
ConfigTester = MODULES["test_configuration_common"].ConfigTester

# Tests skipped, each with its reason. Kept to features libmoe's research model does not have.
SKIPS = {
}


class LibMoEModelTester:
    """The model tester the common tests drive (what transformers' CausalLMModelTester does, for
    the sdist's files, which lack it): a 2-layer SMoE model, 8 experts, top-2."""

    config_class = LibMoEConfig
    base_model_class = LibMoEModel
    causal_lm_class = LibMoEForCausalLM
    all_model_classes = (LibMoEModel, LibMoEForCausalLM)

    def __init__(self, parent, batch_size=13, seq_length=7):
        self.parent = parent
        self.batch_size, self.seq_length = batch_size, seq_length
        self.is_training, self.use_input_mask, self.use_labels = True, True, True
        self.vocab_size, self.hidden_size, self.num_hidden_layers = 99, 32, 2
        self.num_attention_heads, self.head_dim = 2, 16
        self.num_experts, self.num_experts_per_tok, self.moe_intermediate_size = 8, 2, 16
        self.max_position_embeddings = 512
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def get_config(self) -> LibMoEConfig:
        return LibMoEConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            head_dim=self.head_dim, num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok, moe_intermediate_size=self.moe_intermediate_size,
            max_position_embeddings=self.max_position_embeddings, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)

    def prepare_config_and_inputs_for_common(self):
        import torch

        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        mask = torch.tril(torch.ones_like(input_ids))
        return self.get_config(), {"input_ids": input_ids, "attention_mask": mask}


class LibMoEOverrides:
    """Where libmoe's classes need a common test adjusted, each with its reason: transformers picks
    the inputs and the models a test applies to by class name from its fixed lists of its own
    classes (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES), which libmoe's classes,
    registered with the Auto classes at run time, are not in. These give them the treatment those
    lists give transformers' causal LMs and base models."""

    def prepare_config_and_inputs_for_common(self):  # newer GenerationTesterMixins ask the test
        return self.model_tester.prepare_config_and_inputs_for_common()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        import torch

        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        causal_lm = model_class.__name__ in ("LibMoEForCausalLM", "LibMoEUpcycledForCausalLM")
        if return_labels and causal_lm and "labels" not in inputs:
            tester = self.model_tester  # a causal LM's labels, as transformers gives its own
            inputs["labels"] = torch.zeros((tester.batch_size, tester.seq_length), dtype=torch.long)
        return inputs

    def test_training(self):
        # base models have no loss: transformers leaves its own out of this test (MODEL_MAPPING_NAMES)
        self.all_model_classes = tuple(c for c in self.all_model_classes if c is not LibMoEModel)
        super().test_training()



def _skips(cls: type) -> type:
    for name, reason in SKIPS.items():
        if hasattr(cls, name):
            setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
    return cls


if MODULES["causal_lm_tester"] is not None and MODULES["generation"] is not None:
    causal = MODULES["causal_lm_tester"]

    class LibMoECausalLMTester(causal.CausalLMModelTester):
        config_class = LibMoEConfig
        base_model_class = LibMoEModel
        causal_lm_class = LibMoEForCausalLM

    @_skips
    class LibMoEModelTest(LibMoEOverrides, causal.CausalLMModelTest, unittest.TestCase):
        model_tester_class = LibMoECausalLMTester

else:  # the sdist's files: ModelTesterMixin with the tester above, and ConfigTester

    @_skips
    class LibMoEModelTest(LibMoEOverrides, common.ModelTesterMixin, unittest.TestCase):
        all_model_classes = LibMoEModelTester.all_model_classes
        # No GenerationTesterMixin in the sdist: generate is tested in test_hf_decoding.py instead.
        all_generative_model_classes = ()

        def setUp(self):
            self.model_tester = LibMoEModelTester(self)
            self.config_tester = ConfigTester(self, config_class=LibMoEConfig, hidden_size=32)

        def test_config(self):
            self.config_tester.run_common_tests()


class UpcycledModelTester(LibMoEModelTester):
    """A 2-layer Llama upcycled to SMoE (8 experts, top-2): LibMoEUpcycledForCausalLM."""

    def __init__(self, parent, batch_size=13, seq_length=7):
        super().__init__(parent, batch_size, seq_length)
        self.intermediate_size = 16

    def get_config(self):
        from libmoe.models.hf_upcycled import LibMoEUpcycledConfig

        return LibMoEUpcycledConfig(
            base_model_type="llama", algorithm="smoe", num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)


def _upcycled_test_class() -> type:
    from libmoe.models.hf_upcycled import LibMoEUpcycledConfig, LibMoEUpcycledForCausalLM

    generation = MODULES["generation"]
    bases = (common.ModelTesterMixin,) + ((generation.GenerationTesterMixin,) if generation else ())

    class UpcycledTest(LibMoEOverrides, *bases, unittest.TestCase):
        all_model_classes = (LibMoEUpcycledForCausalLM,)
        if generation is None:  # no GenerationTesterMixin in the sdist: see test_hf_decoding.py
            all_generative_model_classes = ()

        def setUp(self):
            self.model_tester = UpcycledModelTester(self)
            self.config_tester = ConfigTester(self, config_class=LibMoEUpcycledConfig, hidden_size=32)

        def test_config(self):
            self.config_tester.run_common_tests()

    return _skips(UpcycledTest)


LibMoEUpcycledModelTest = _upcycled_test_class()
