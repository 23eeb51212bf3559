"""What local mode starts the router with comes from the manifest: the model's maxModelLen (a
900-token prompt asking for 1000 tokens on a 1024-token model is refused naming 1024) and the
migration knobs."""

import pytest
from support.serving import manifest

from phasesplit.local.plan import build_plan, validate_manifest
from phasesplit.router.admission import AdmissionSettings
from phasesplit.router.main import build_parser, settings_from_args
from phasesplit.router.openai_api import APIError, CompletionRequest
from phasesplit.router.prompts import sampling_params


def router_settings(doc: dict, model_dir):
    plan = build_plan(validate_manifest(doc), str(model_dir), port=0)
    return settings_from_args(build_parser().parse_args(["--model", str(model_dir), *plan.router_args]))


def test_local_mode_gives_the_router_the_manifests_max_model_len_and_migration_knobs(tiny_model_dir):
    doc = manifest("len", {"prompt": 1, "token": 1})
    doc["spec"]["model"]["maxModelLen"] = 1024
    doc["spec"]["router"]["migration"] = {"maxAttempts": 5, "stallTimeoutSeconds": 7}
    settings = router_settings(doc, tiny_model_dir)
    assert settings.max_model_len == 1024
    assert (settings.migration.max_attempts, settings.migration.stall_timeout) == (5, 7.0)
    with pytest.raises(APIError, match="maximum context length is 1024 tokens.*not 1000") as err:
        sampling_params(CompletionRequest(model="tiny", prompt="x", max_tokens=1000), 900, settings.max_model_len)
    assert err.value.param == "max_tokens"


def test_local_mode_gives_the_router_the_manifests_admission_settings(tiny_model_dir):
    doc = manifest("admission", {"prompt": 1, "token": 1})
    doc["spec"]["router"]["admission"] = {"maxQueueWaitSeconds": 5, "maxQueueLength": 64, "maxStreamsPerKey": 8}
    admission = router_settings(doc, tiny_model_dir).admission
    assert (admission.max_queue_wait, admission.max_queue_length, admission.max_streams_per_key) == (5.0, 64, 8)


def test_admission_defaults_are_generous(tiny_model_dir):
    doc = manifest("defaults", {"mixed": 1})
    del doc["spec"]["router"]
    assert router_settings(doc, tiny_model_dir).admission == AdmissionSettings(30.0, 1024, 1024)


def test_migration_is_on_by_default(tiny_model_dir):
    doc = manifest("defaults", {"mixed": 1})
    del doc["spec"]["router"]
    assert router_settings(doc, tiny_model_dir).migration.max_attempts == 3


@pytest.mark.parametrize("flags, message", [
    (["--queue-size", "-1"], "--queue-size must be >= 0"),
    (["--queue-timeout", "0"], "--queue-timeout > 0"),
    (["--max-queue-wait", "0"], "--max-queue-wait > 0"),
    (["--max-queue-length", "-1"], "--max-queue-length and --max-streams-per-key must be >= 0"),
    (["--header-timeout", "0"], "--header-timeout and --body-timeout must be > 0"),
    (["--pools", "prompt,decode"], "--pools: unknown pool decode; allowed: prompt, token, mixed"),
])
def test_bad_queue_settings_name_the_flag(tiny_model_dir, flags, message):
    with pytest.raises(SystemExit, match=message):
        settings_from_args(build_parser().parse_args(["--model", str(tiny_model_dir), *flags]))


def test_local_mode_serves_every_pool_of_the_plan_and_queues_by_default(tiny_model_dir, tmp_path):
    from phasesplit.local.launcher import LocalCluster
    doc = manifest("zero", {"prompt": 1, "token": 0})
    plan = build_plan(validate_manifest(doc), str(tiny_model_dir), port=0)
    argv = LocalCluster(plan, tmp_path).router_argv(8000)
    settings = settings_from_args(build_parser().parse_args(argv[argv.index("--model"):]))
    assert settings.pools == ("prompt", "token") and settings.workers["token"] == []
    assert (settings.queue.size, settings.queue.timeout) == (256, 120.0)


def test_without_a_model_directory_the_router_needs_the_served_name_and_takes_the_length_from_workers():
    with pytest.raises(SystemExit, match="--served-model-name is required without --model"):
        settings_from_args(build_parser().parse_args(["--token-workers", "w:1"]))
    settings = settings_from_args(build_parser().parse_args(["--served-model-name", "llama", "--mixed-workers", "w:1"]))
    assert settings.served_model_name == "llama" and settings.max_model_len is None
