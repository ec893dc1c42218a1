"""Regenerate the deel-lip (Keras) exports in this folder with tf2onnx, the way a Keras user
exports: ``model.vanilla_export()``, then ``tf2onnx.convert.from_keras``. Needs TensorFlow,
so it runs in its own environment, not in the tests:

    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0 tf2onnx==1.17.0 \\
        deel-lip==1.5.0
    TF_USE_LEGACY_KERAS=1 /tmp/tfvenv/bin/python export_deel_lip.py gs2   # also fullsort, gs4

deel-lip 1.5.0 needs Keras 2 (tf-keras); with Keras 3 its Sequential fails to build. What
tf2onnx 1.17 writes: GroupSort2 as Reshape, Split, Min, Max, Concat, Reshape; FullSort and
GroupSort(4) as Reshape, Neg, TopK (k from Shape, Cast, Slice, Squeeze, Unsqueeze), Neg,
Reshape (an ascending sort as a descending sort of -x). The layers are 1-Lipschitz
(SpectralDense, FrobeniusDense); their random weights are all the tests need.
"""

import sys

import numpy as np
import tensorflow as tf
import tf2onnx
from deel.lip.activations import FullSort, GroupSort, GroupSort2
from deel.lip.layers import FrobeniusDense, SpectralDense
from deel.lip.model import Sequential

ACTIVATIONS = {"gs2": GroupSort2, "fullsort": FullSort, "gs4": lambda: GroupSort(4)}


def main(kind: str) -> None:
    tf.keras.utils.set_random_seed(0)
    act = ACTIVATIONS[kind]
    model = Sequential([tf.keras.layers.Input((16,)), SpectralDense(32), act(),
                        SpectralDense(32), act(), FrobeniusDense(4)], k_coef_lip=1.0)
    plain = model.vanilla_export()
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    print(plain(x).numpy()[:1])
    spec = (tf.TensorSpec((None, 16), tf.float32, name="x"),)
    onnx_model, _ = tf2onnx.convert.from_keras(plain, input_signature=spec, opset=17,
                                               output_path=f"deel_{kind}.onnx")
    print("ONNX ops:", [n.op_type for n in onnx_model.graph.node])


if __name__ == "__main__":
    main(sys.argv[1])
