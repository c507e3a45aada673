"""What FLARE's homomorphic encryption would cost on the wire for brats-fl's model: bytes and seconds per update.

    pip install tenseal==0.3.18 && python benchmarks/he_size.py [--channels 16 32 64 128]

Encrypts one update of the U-Net (every value of its state dict) as a CKKS vector with the parameters FLARE's
``HEBuilder`` provisions by default (polynomial modulus degree 8192, coefficient moduli 60-40-40 bits, scale 2^40),
as FLARE's ``HEModelEncryptor`` does layer by layer, and prints its serialised size against float32 and the time to
encrypt and decrypt. TenSEAL is not a dependency of brats-fl (docs/howto/privacy.md says why HE is not offered).
Prints JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import tenseal as ts
import torch
from brats_fl.seg.model import BratsUNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args()
    model = BratsUNet(channels=args.channels, strides=[2] * (len(args.channels) - 1), init_seed=0)
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    context.global_scale = 2**40
    context.generate_galois_keys()
    layers = [v.detach().flatten().double().numpy() for v in model.state_dict().values() if v.is_floating_point()]
    start = time.perf_counter()
    encrypted = [ts.ckks_vector(context, layer) for layer in layers]
    encrypt_s = time.perf_counter() - start
    wire = sum(len(e.serialize()) for e in encrypted)
    start = time.perf_counter()
    error = max(
        float(abs(torch.tensor(e.decrypt()) - torch.tensor(v)).max()) for e, v in zip(encrypted, layers, strict=True)
    )
    decrypt_s = time.perf_counter() - start
    values = sum(len(v) for v in layers)
    print(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()}, torch {torch.__version__}",
                "model": f"U-Net {'-'.join(map(str, args.channels))}, {values:,} values in {len(layers)} tensors",
                "float32_bytes": 4 * values,
                "ckks_bytes": wire,
                "expansion": wire / (4 * values),
                "encrypt_s": encrypt_s,
                "decrypt_s": decrypt_s,
                "largest_decryption_error": error,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
