"""Privacy: differential privacy with accounting, and secure aggregation.

- `dp`: per-client clipping, central DP-FedAvg (McMahan et al., ICLR 2018)
  with fixed or adaptive quantile clipping (Andrew et al., NeurIPS 2021), and
  local DP.  Works on (n, d) matrices, vectorised.
- `accountant`: (epsilon, delta) after every round from `dp-accounting`
  (RDP or PLD), budget checks before a round, planning.
- `quantize`, `shamir`, `secagg`: secure aggregation with dropout recovery
  (Bonawitz et al., CCS 2017; optional SecAgg+ graph, Bell et al., CCS 2020).
  The in-process `secure_sum` costs O(n^2) X25519 key agreements per round.
- `compatibility`: combinations that cannot work are refused with a reason.
- `parts`: the `[privacy]` settings and `build_privacy`, the engine's entry point.
"""

from .accountant import PrivacyAccountant, PrivacySpent, dp_event
from .compatibility import PRIVACY_MODES, check_compatible, parse_privacy_mode
from .dp import (
    AdaptiveClipping,
    CentralDP,
    DPAggregate,
    GaussianMechanism,
    LocalDP,
    central_noise,
    clip_updates,
    local_noise,
)
from .parts import PrivacyParts, PrivacySettings, build_privacy
from .quantize import Quantizer
from .telemetry import PrivateTelemetry, PrivateTelemetryHook
from .secagg import (
    AdvertiseKeys,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    SecAggClient,
    SecAggDropoutError,
    SecAggError,
    SecAggServer,
    SecAggTamperError,
    SecAggTranscript,
    SecureAggregation,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    run_secagg,
    secure_sum,
)
from .shamir import ShamirError, combine_shares, split_secret

__all__ = [
    "PrivateTelemetry", "PrivateTelemetryHook",
    "PRIVACY_MODES",
    "AdaptiveClipping",
    "AdvertiseKeys",
    "CentralDP",
    "DPAggregate",
    "ForwardedShares",
    "GaussianMechanism",
    "KeyDirectory",
    "LocalDP",
    "MaskedInput",
    "PrivacyAccountant",
    "PrivacyParts",
    "PrivacySettings",
    "PrivacySpent",
    "Quantizer",
    "SecAggClient",
    "SecAggDropoutError",
    "SecAggError",
    "SecAggServer",
    "SecAggTamperError",
    "SecAggTranscript",
    "SecureAggregation",
    "ShamirError",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskShares",
    "build_privacy",
    "central_noise",
    "check_compatible",
    "clip_updates",
    "combine_shares",
    "dp_event",
    "local_noise",
    "parse_privacy_mode",
    "run_secagg",
    "secure_sum",
    "split_secret",
]
