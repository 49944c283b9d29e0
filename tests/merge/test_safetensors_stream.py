import torch
from safetensors.torch import load_file, save_file

from qlora_app.merge.safetensors_stream import StreamWriter, iter_tensors


def test_stream_reader_and_writer_agree_with_the_safetensors_library(tmp_path):
    tensors = {"b.weight": torch.randn(3, 5).to(torch.bfloat16), "a.bias": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2), "empty": torch.empty(0, 4, dtype=torch.float16)}
    save_file(tensors, tmp_path / "lib.safetensors")
    read = dict(iter_tensors(tmp_path / "lib.safetensors"))
    assert set(read) == set(tensors) and all(torch.equal(read[k], tensors[k]) for k in tensors)

    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with StreamWriter(tmp_path / "ours.safetensors", layout) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    back = load_file(tmp_path / "ours.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
