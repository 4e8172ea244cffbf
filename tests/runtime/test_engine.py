"""``SamplingParams``: the one check of the sampler's settings, and the temperature its log-probs are taken at."""

import math

import pytest

from hotloop.runtime.engine import SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("temperature", -1e-3),
        ("temperature", True),
        ("top_p", math.nan),
        ("top_p", math.inf),
        ("top_p", 0.0),
    ],
)
def test_non_finite_or_out_of_range_sampling_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: expected .*, got {value!r}$"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("temperature, expected", [(0.0, 1.0), (0.7, 0.7), (1.3, 1.3)])
def test_log_probs_are_taken_at_the_sampling_temperature_and_untempered_when_greedy(temperature, expected):
    assert SamplingParams(temperature=temperature).logprob_temperature == expected
