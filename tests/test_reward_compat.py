"""One test per adaptation in rewards/compat.py (H1, I1-I5)."""

import subprocess
import sys

import pytest
import torch

from rewards import compat


def test_h1_hpsv2_tokenizer_uses_clips_vocabulary():
    import open_clip

    target = compat.ensure_hpsv2_vocab()
    source = compat._package_dir("open_clip") / compat.BPE_FILE
    assert target.read_bytes() == source.read_bytes()
    hps = compat.hpsv2_open_clip()
    captions = ["a small red circle at the top left", "two blue squares on a green background"]
    assert torch.equal(hps.get_tokenizer("ViT-H-14")(captions), open_clip.get_tokenizer("ViT-H-14")(captions))


def test_i1_scoring_modules_import_without_the_training_code():
    # ReFL is ImageReward's training module (it needs clip and datasets, which are not installed). accelerate is not
    # checked: it is installed now (peft needs it) and transformers imports it by itself when present.
    code = ("import sys; from rewards import compat; compat.imagereward_modules(); "
            "print(sorted(m for m in ('clip', 'datasets', 'ImageReward.ReFL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_i2_transformers_helpers_where_med_imports_them():
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    compat.imagereward_modules()
    assert modeling_utils.apply_chunking_to_forward is pytorch_utils.apply_chunking_to_forward
    assert modeling_utils.prune_linear_layer is pytorch_utils.prune_linear_layer
    with pytest.raises(NotImplementedError):
        modeling_utils.find_pruneable_heads_and_indices([0], 2, 4, set())


def test_i3_masks_have_transformers_4_semantics():
    compat.imagereward_modules()
    from ImageReward.models.BLIP.med import BertModel

    model = torch.nn.Linear(1, 1)  # any module: only .dtype is read
    model.dtype = torch.float32
    inverted = BertModel.invert_attention_mask(model, torch.tensor([[1, 1, 0]]))
    assert inverted.shape == (1, 1, 1, 3)
    assert inverted[0, 0, 0].tolist() == [0.0, 0.0, torch.finfo(torch.float32).min]
    assert BertModel.get_head_mask(model, None, 3) == [None, None, None]
    with pytest.raises(NotImplementedError):
        BertModel.get_head_mask(model, torch.ones(2), 3)


def test_i4_blip_tokenizer_from_a_local_folder(tmp_path):
    words = ["a", "red", "ball"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = compat.blip_tokenizer(tmp_path)
    assert tokenizer.bos_token == "[DEC]" and tokenizer.convert_tokens_to_ids("[DEC]") == 8
    assert tokenizer.enc_token_id == 9 and len(tokenizer) == 10
    assert tokenizer("a red ball").input_ids == [2, 5, 6, 7, 3]
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain

    original = blip_pretrain.init_tokenizer
    with compat.blip_tokenizer_from(tmp_path):
        assert blip_pretrain.init_tokenizer().enc_token_id == 9
    assert blip_pretrain.init_tokenizer is original  # restored after the constructor


def test_i5_text_encoder_initialises_like_transformers_4():
    compat.imagereward_modules()
    from ImageReward.models.BLIP.med import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, add_cross_attention=True, initializer_range=0.02)
    config.encoder_width = 16
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False)
    weight = model.encoder.layer[0].attention.self.query.weight
    assert abs(weight.std().item() - 0.02) < 0.004 and model.encoder.layer[0].attention.self.query.bias.abs().max() == 0


def test_h2_hpsv2_imports_on_a_python_without_tkinter():
    code = ("import sys; sys.modules['tkinter'] = None; from rewards import compat; "  # None: import tkinter fails
            "oc = compat.hpsv2_open_clip(); print(callable(oc.create_model_and_transforms), 'turtle' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["True", "False"]  # imported, and the stand-in is gone afterwards
