"""The message contract: every message a run publishes validates against the JSON Schemas."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from defectd.pipeline.inspection import Defect, Inspection, Verdict
from defectd.publish import MqttConfig, OutboxConfig, Publisher, StatusInfo
from defectd.publish.messages import encode, load_schema, schema_errors
from defectd.testing.mosquitto import Mosquitto

KIND_BY_TOPIC_END = {"result": "result", "reject": "reject", "status": "status", "events": "event"}


def inspections() -> list[Inspection]:
    t = time.time()
    return [
        Inspection("st1", "cam0", 0, Verdict.PASS, t_grab_wall=t, model_name="unet",
                   model_sha256="ab" * 32, config_hash="c0", image_shape=(480, 640),
                   latencies_ms={"infer": 4.2, "total": 9.1}),
        Inspection("st1", "cam1", 1, Verdict.FAIL, part_id="P-0001", t_grab_wall=t,
                   rule="area>=0.5mm2&score>=0.6",
                   defects=(Defect(120, (10, 20, 12, 14), (16.0, 27.5), 0.93, 0.71, 0.84),
                            Defect(30, (100, 3, 5, 6), (102.1, 5.9), 0.65, 0.61))),
        Inspection("st1", "cam0", 2, Verdict.ERROR, t_grab_wall=t, rule="error:overload",
                   reason="queue full"),
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["result", "reject", "status", "event"])
def test_each_schema_is_a_valid_draft_2020_12_schema(kind: str) -> None:
    from jsonschema import Draft202012Validator

    schema = load_schema(kind)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_every_message_of_a_run_validates_against_its_schema(
    mosquitto: Callable[..., Mosquitto], mqtt_collector: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, "contract/#")
    config = MqttConfig(host=broker.host, port=broker.port, topic_prefix="contract")
    pub = Publisher(config, OutboxConfig(path=tmp_path / "o.sqlite"), "st1")
    pub.set_status(StatusInfo(version="0.1.0", model_name="unet", model_sha256="ab" * 32,
                              config_hash="c0", cameras=("cam0", "cam1")))  # fmt: skip
    pub.start()
    for item in inspections():
        pub.submit(item)
    pub.publish_event("camera_lost", camera="cam1", reason="fetch timeout")
    pub.publish_event("model_reloaded", model="unet", sha256="ab" * 32)
    # 3 results, 2 rejects, 2 events, online + offline status
    assert sub.wait_for(lambda ms: len(ms) >= 8)
    pub.stop()
    assert sub.wait_for(lambda ms: len(ms) >= 9)

    kinds: list[str] = []
    for msg in sub.messages:
        kind = KIND_BY_TOPIC_END[msg.topic.rsplit("/", 1)[1]]
        kinds.append(kind)
        payload = json.loads(msg.payload)
        assert schema_errors(kind, payload) == [], msg.topic
    assert sorted(kinds) == sorted(["result"] * 3 + ["reject"] * 2 + ["event"] * 2 + ["status"] * 2)


def test_a_non_finite_score_is_published_as_null_and_still_validates() -> None:
    from defectd.publish.messages import result_message

    item = Inspection("st1", "cam0", 0, Verdict.FAIL, rule="r",
                      defects=(Defect(5, (0, 0, 2, 2), (1.0, 1.0), math.nan, 0.5),))  # fmt: skip
    payload = json.loads(encode(result_message(item, time.time())))
    assert payload["defects"][0]["score_max"] is None
    assert schema_errors("result", payload) == []


def test_the_schema_catches_an_undocumented_field() -> None:
    from defectd.publish.messages import reject_message

    payload = json.loads(encode(reject_message(inspections()[1], time.time())))
    payload["surprise"] = 1
    assert any("surprise" in e for e in schema_errors("reject", payload))
