"""Bad input on both backends, one table per area: every mistake answers a 4xx (never a 5xx) whose JSON error
says what was wrong and where (the line and field of a dataset, the parameter of a request), stores nothing,
and never reads or writes a file outside the artifacts folder.

tests/service/test_api.py covers the first cases of each area (a line that is not JSON, a missing field, an
unknown role, an empty file, n_epochs 0, rho 1.5, rho below rho_min, unknown model and file ids, another
tenant's objects on every route); these tables add the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from api.config import Settings
from api.ids import new_id
from api.keys import authenticate
from api.tables import Checkpoint, File
from tests.service.service_calls import (
    DEMO,
    JOBS,
    SMALL_EXAMPLES,
    SMALL_HP,
    SMALL_RHO,
    dataset_lines,
    job_body,
    new_key,
    upload,
)

ROUTES_WITH_IDS = ("estimates", "jobs")
PATHS = {"estimates": "/v1/estimates", "jobs": JOBS}  # the POST of each
GOOD = json.dumps({"prompt": "What is 1 plus 1? ", "completion": "It is 2."})


def lines(*records: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def assert_error(response: Response, status: int, code: str, case: object) -> dict:
    """The answer is ``status`` with a JSON error of ``code``; returns the error."""
    assert response.status_code == status, (case, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["code"] == code and error["message"], (case, error)
    return error


def post_raw(client: TestClient, path: str, body: str) -> Response:
    """POST a JSON body as written (Infinity and NaN included, which json.dumps would not write)."""
    return client.post(path, content=body.encode(), headers={"Content-Type": "application/json"})


def test_dataset_mistakes_name_the_line_and_the_field(client: TestClient) -> None:
    deep = "[" * 100_000  # deeper than the JSON parser recurses
    cases = [  # (what, file bytes, line, field, words in the message)
        (
            "not UTF-8 on line 2",
            lines(GOOD) + b'{"prompt": "caf\xe9", "completion": "b"}\n',
            2,
            None,
            "UTF-8",
        ),
        ("UTF-16", GOOD.encode("utf-16") + b"\n", 1, None, "UTF-8"),
        ("blank lines only", b"\n   \n\t\n", None, None, "empty"),
        ("a JSON array", lines([1, 2]), 1, None, "JSON object"),
        ("no known keys", lines({"question": "a", "answer": "b"}), 1, None, "expected"),
        ("keys of two formats", lines({"prompt": "a", "completion": "b", "text": "c"}), 1, None, "mixes"),
        ("formats differ by line", lines(GOOD, {"text": "a", "label": "x"}), 2, None, "one format per file"),
        ("prompt not a string", lines(GOOD, {"prompt": 5, "completion": "b"}), 2, "prompt", "string"),
        ("empty completion", lines({"prompt": "a", "completion": "  "}), 1, "completion", "empty"),
        ("messages not a list", lines({"messages": "hi"}), 1, "messages", "list"),
        ("a message not an object", lines({"messages": ["hi"]}), 1, "messages[0]", "object"),
        ("a message without role", lines({"messages": [{"content": "x"}]}), 1, "messages[0].role", "one of"),
        (
            "content not a string",
            lines({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}),
            1,
            "messages[1].content",
            "string",
        ),
        (
            "no assistant message",
            lines({"messages": [{"role": "user", "content": "q"}]}),
            1,
            "messages",
            "assistant",
        ),
        ("text missing", lines({"text": "a", "label": "x"}, {"label": "y"}), 2, "text", "missing"),
        (
            "label a float",
            lines({"text": "a", "label": "x"}, {"text": "b", "label": 1.5}),
            2,
            "label",
            "label",
        ),
        ("label a boolean", lines({"text": "a", "label": True}), 1, "label", "label"),
        (
            "a label set of one",
            lines(*[{"text": f"t{i}", "label": "spam"} for i in range(3)]),
            None,
            "label",
            "at least 2 distinct labels",
        ),
        ("nested too deeply", lines(GOOD) + deep.encode() + b"\n", 2, None, "nested"),
        (
            "an integer of 5000 digits",
            lines({"text": "a", "label": "x"}, '{"text": "b", "label": ' + "9" * 5000 + "}"),
            2,
            None,
            "JSON",
        ),
    ]
    for what, body, line, field, words in cases:
        response = client.post(
            "/v1/files", files={"file": ("bad.jsonl", body)}, data={"purpose": "fine-tune"}
        )
        error = assert_error(response, 400, "invalid_dataset", what)
        assert (error["line"], error["field"]) == (line, field), (what, error)
        assert words in error["message"], (what, error["message"])
        if line is not None:
            assert error["message"].startswith(f"line {line}"), (what, error["message"])
    assert client.get("/v1/files").json()["data"] == []  # nothing stored

    # A byte-order mark (written by some editors) is not a mistake.
    bom = client.post("/v1/files", files={"file": ("bom.jsonl", b"\xef\xbb\xbf" + lines(GOOD, GOOD))})
    assert bom.status_code == 200 and bom.json()["examples"] == 2


def test_examples_longer_than_max_seq_len(client: TestClient) -> None:
    """Examples are cut at max_seq_len and counted; one left with nothing to learn from is refused, naming its
    line."""
    long = "word " * 100
    short = [
        {"prompt": f"What is {i} plus {i}? ", "completion": f"It is {2 * i}."} for i in range(SMALL_EXAMPLES)
    ]
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(SMALL_EXAMPLES)
    ]
    classes = [{"text": f"review {i}", "label": ["good", "bad"][i % 2]} for i in range(SMALL_EXAMPLES)]
    files = {
        "prompt cut": lines(*short[:2], {"prompt": long, "completion": "ok"}, *short[2:]),
        "completion cut": lines(*short[:2], {"prompt": "Say it: ", "completion": long}, *short[2:]),
        "chat cut": lines(
            *chat[:4], {"messages": [{"role": "user", "content": long}, chat[0]["messages"][1]]}, *chat[4:]
        ),
        "text cut": lines(*classes[:1], {"text": long, "label": "good"}, *classes[1:]),
    }
    ids = {name: upload(client, body.decode(), f"{name}.jsonl")["id"] for name, body in files.items()}
    cases = [  # (file, max_seq_len, refused line and field, or truncated examples when accepted)
        ("prompt cut", 32, (3, "completion"), None),
        ("prompt cut", 512, None, 0),
        ("completion cut", 32, None, 1),
        ("chat cut", 64, (5, "messages"), None),
        ("chat cut", 512, None, 0),
        ("text cut", 32, None, 1),
    ]
    for name, max_seq_len, refused, truncated in cases:
        for route in ROUTES_WITH_IDS:
            body = job_body(ids[name], "full", max_seq_len=max_seq_len)
            response = client.post(PATHS[route], json=body)
            case = (name, max_seq_len, route)
            if refused is None:
                assert response.status_code == 200, (case, response.text)
                if route == "estimates":
                    assert response.json()["truncated_examples"] == truncated, case
                continue
            error = assert_error(response, 400, "invalid_dataset", case)
            assert (error["line"], error["field"]) == refused, (case, error)
            assert f"max_seq_len={max_seq_len}" in error["message"], (case, error["message"])


@pytest.mark.parametrize("route", ROUTES_WITH_IDS)
def test_hyperparameters_out_of_range(client: TestClient, route: str) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    start = f'{{"model": "{DEMO}", "training_file": "{file_id}"'
    where = "method.green.hyperparameters"  # the parameter an error names
    hp = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in {**SMALL_HP, "rho": SMALL_RHO}.items())

    def green(hyperparameters: str) -> str:
        """The body with method green and these hyperparameters (JSON text)."""
        return f'{start}, "method": {{"type": "green", "green": {{"hyperparameters": {hyperparameters}}}}}}}'

    cases = [  # (what the body holds, the parameter named)
        ('"batch_size": 0', "batch_size"),
        ('"batch_size": 1000000000', "batch_size"),
        ('"learning_rate": -0.001', "learning_rate"),
        ('"learning_rate": 0', "learning_rate"),
        ('"learning_rate": 1e300', "learning_rate"),
        ('"learning_rate": NaN', "learning_rate"),
        ('"n_epochs": 1000000000', "n_epochs"),
        ('"n_epochs": 2.5', "n_epochs"),
        ('"n_epochs": "three"', "n_epochs"),
        ('"max_seq_len": 0', "max_seq_len"),
        ('"max_seq_len": 1000000000', "max_seq_len"),
        ('"reselect_every": 0', "reselect_every"),
        ('"importance_batches": 100000', "importance_batches"),
        ('"warmup_steps": -1', "warmup_steps"),
        ('"weight_decay": 2', "weight_decay"),
        ('"max_grad_norm": 0', "max_grad_norm"),
        ('"max_grad_norm": Infinity', "max_grad_norm"),
    ]
    path = PATHS[route]
    for fragment, param in cases:
        key = fragment.split(":")[0].strip('"')
        rest = ", ".join(p for p in hp.split(", ") if not p.startswith(f'"{key}"'))
        response = post_raw(client, path, green(f"{{{rest}, {fragment}}}"))
        error = assert_error(response, 400, "invalid_request", fragment)
        assert error["param"] == f"{where}.{param}" and key in error["message"], (fragment, error)
    # The whole-run budgets and the request's other fields.
    for body, param in [
        (green('{"max_flops": Infinity}'), f"{where}.max_flops"),
        (green('{"max_energy_kwh": -1}'), f"{where}.max_energy_kwh"),
        (green("[1, 2]"), where),
        (f'{start}, "seed": -1}}', "seed"),
        (f'{start}, "seed": 1e400}}', "seed"),
    ]:
        error = assert_error(post_raw(client, path, body), 400, "invalid_request", body[-60:])
        assert error["param"] == param, (body[-60:], error)
    for body in (f"{start}", "not json", "[]", "{" * 100_000, "[" * 100_000):  # not a JSON object at all
        response = post_raw(client, path, body)
        assert 400 <= response.status_code < 500 and "error" in response.json(), (
            body[:40],
            response.text[:200],
        )
    assert post_raw(client, path, green(f"{{{hp}}}")).status_code == 200
    assert len(client.get(JOBS).json()["data"]) == (1 if route == "jobs" else 0)  # only the good one


@pytest.mark.parametrize("route", ROUTES_WITH_IDS)
def test_rho_outside_zero_one_or_below_rho_min(client: TestClient, route: str) -> None:
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]

    def post(rho: object) -> Response:
        return client.post(PATHS[route], json=job_body(file_id, rho=rho))

    for rho in (0, -0.5, 1.0000001, 1.5, "half"):
        error = assert_error(post(rho), 400, "invalid_request", rho)
        assert error["param"] == "method.green.hyperparameters.rho", (rho, error)
    error = assert_error(post(0.2), 400, "budget_too_small", 0.2)
    assert error["rho_min"] > 0.2 and f"rho_min={error['rho_min']:.4f}" in error["message"]
    accepted = post(1.0)
    assert accepted.status_code == 200 and accepted.json()["rho"] == 1.0


@pytest.fixture
def other_tenants_objects(app, client: TestClient, sessions, settings: Settings) -> dict:
    """Tenant A (``client``): a file, a job and a checkpoint of that job, with its folder in the artifacts."""
    file_id = upload(client, dataset_lines(SMALL_EXAMPLES))["id"]
    job_id = client.post(JOBS, json=job_body(file_id, rho=SMALL_RHO)).json()["id"]
    relative = f"checkpoints/{job_id}/epoch-1"
    assert settings.artifacts_dir is not None
    folder = settings.artifacts_dir / relative
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    checkpoint_id = new_id("ckpt")
    with sessions() as session:
        session.add(
            Checkpoint(id=checkpoint_id, job_id=job_id, name="epoch-1", epoch=1, path=relative, bytes=2)
        )
        session.commit()
    assert client.get(f"{JOBS}/{job_id}/checkpoints/{checkpoint_id}/content").status_code == 200  # A's own
    return {"file": file_id, "job": job_id, "checkpoint": checkpoint_id}


def test_unknown_and_foreign_ids(app, sessions, other_tenants_objects: dict) -> None:
    a = other_tenants_objects
    b = TestClient(app, headers={"Authorization": f"Bearer {new_key(sessions)}"})  # tenant B
    b_file = upload(b, dataset_lines(SMALL_EXAMPLES))["id"]
    b_job = b.post(JOBS, json=job_body(b_file, rho=SMALL_RHO)).json()["id"]
    unknown = {"file": new_id("file"), "job": new_id("ftjob"), "checkpoint": new_id("ckpt")}
    paths = []
    for ids in (unknown, a):  # ids that do not exist, and tenant A's
        paths += [
            ("GET", f"/v1/files/{ids['file']}"),
            ("GET", f"{JOBS}/{ids['job']}"),
            ("POST", f"{JOBS}/{ids['job']}/cancel"),
            ("GET", f"{JOBS}/{ids['job']}/epochs"),
            ("GET", f"{JOBS}/{ids['job']}/events"),
            ("GET", f"{JOBS}/{ids['job']}/checkpoints"),
            ("GET", f"{JOBS}/{ids['job']}/checkpoints/{ids['checkpoint']}/content"),
            ("GET", f"{JOBS}/{b_job}/checkpoints/{ids['checkpoint']}/content"),
        ]  # B's job, not its checkpoint
    for verb, path in paths:
        assert_error(b.request(verb, path), 404, "not_found", path)
    for route in ROUTES_WITH_IDS:  # ids named in a body: 400 naming the parameter
        for param in ("training_file", "validation_file"):
            for file_id in (unknown["file"], a["file"]):
                body = {**job_body(b_file, rho=SMALL_RHO), param: file_id}
                if route == "estimates" and param == "validation_file":
                    continue  # an estimate takes no validation file
                error = assert_error(b.post(PATHS[route], json=body), 400, "invalid_request", (route, param))
                assert error["param"] == param and "not found" in error["message"]
    assert [j["id"] for j in b.get(JOBS).json()["data"]] == [b_job]


TRICKS = [  # as they appear in a URL
    "..%2F..%2Fetc%2Fpasswd",
    "..%2F..",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2Fetc%2Fpasswd",
    "..%5C..%5Cwindows%5Cwin.ini",
    "%00",
    "file-%00",
    "x" * 5000,
    "%C0%AE%C0%AE%2F",
]
BODY_TRICKS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "\x00",
    "file-\x00",
    "x" * 5000,
    "C:\\windows\\win.ini",
]


def test_path_tricks_in_ids_and_filenames(
    client: TestClient,
    settings: Settings,
    sessions,
    other_tenants_objects: dict,
) -> None:
    own = other_tenants_objects
    for trick in TRICKS:
        for verb, path in [
            ("GET", f"/v1/files/{trick}"),
            ("GET", f"{JOBS}/{trick}"),
            ("POST", f"{JOBS}/{trick}/cancel"),
            ("GET", f"{JOBS}/{trick}/epochs"),
            ("GET", f"{JOBS}/{trick}/events"),
            ("GET", f"{JOBS}/{trick}/checkpoints"),
            ("GET", f"{JOBS}/{trick}/checkpoints/{own['checkpoint']}/content"),
            ("GET", f"{JOBS}/{own['job']}/checkpoints/{trick}/content"),
            ("GET", f"/static/{trick}"),
        ]:
            response = client.request(verb, path)
            assert response.status_code in (404, 405), (path[:80], response.status_code, response.text[:200])
            assert "root:" not in response.text and "error" in response.json(), path[:80]
        for path in ("/v1/files", JOBS, f"{JOBS}/{own['job']}/checkpoints"):  # list cursors
            assert_error(client.get(f"{path}?after={trick}"), 400, "invalid_request", (path, trick[:20]))
    # Number cursors: an epoch number, an event id (ftevent-N).
    for path, prefix in ((f"{JOBS}/{own['job']}/epochs", ""), (f"{JOBS}/{own['job']}/events", "ftevent-")):
        for number in ("-1", str(10**30), "1e3", "%00"):
            after = prefix + number
            assert_error(client.get(f"{path}?after={after}"), 400, "invalid_request", (path, after))
    for path in ("/static/..%2F..%2Fconfig.py", "/static/%2e%2e/%2e%2e/api/config.py", "/static/../app.py"):
        response = client.get(path)
        assert response.status_code == 404 and "GT_" not in response.text, path

    for route in ROUTES_WITH_IDS:  # in a body: ids and model names are looked up, never joined into a path
        for trick in BODY_TRICKS:
            for param in ("training_file", "model"):
                body = job_body(own["file"], rho=SMALL_RHO)
                error = assert_error(
                    client.post(PATHS[route], json={**body, param: trick}),
                    400,
                    "invalid_request",
                    (route, param, trick[:20]),
                )
                assert error["param"] == param and "not found" in error["message"]
    for trick in BODY_TRICKS:  # the model whose tokenizer counts an upload's tokens
        response = client.post("/v1/files", files={"file": ("t.jsonl", lines(GOOD))}, data={"model": trick})
        assert_error(response, 400, "invalid_request", ("upload model", trick[:20]))

    # Upload filenames are labels only: the file is stored as files/<tenant>/<file id>.jsonl in the artifacts.
    assert settings.artifacts_dir is not None
    artifacts = settings.artifacts_dir.resolve()
    before = {p for p in artifacts.parent.rglob("*") if p.is_file()}
    names = {  # sent byte for byte (httpx would escape some), and the name the file is listed under
        b"../../etc/passwd": "passwd",
        b"/etc/passwd": "passwd",
        b"..\\..\\evil.jsonl": "evil.jsonl",
        b"..": "upload.jsonl",
        b"a\x00b\tc\x7f.jsonl": "abc.jsonl",
        b"x" * 1000: "x" * 255,
    }
    for sent, listed in names.items():
        response = raw_upload(client, sent, lines(GOOD))
        assert response.status_code == 200 and response.json()["filename"] == listed, (
            sent[:20],
            response.text,
        )
    with sessions() as session:
        tenant = authenticate(session, client.headers["Authorization"].split()[1])
        assert tenant is not None
        rows = session.query(File).filter(File.tenant_id == tenant.id).all()
    for row in rows:
        assert row.path == f"files/{tenant.id}/{row.id}.jsonl"
    new = {p for p in artifacts.parent.rglob("*") if p.is_file()} - before
    assert new and all(p.resolve().is_relative_to(artifacts) for p in new)
    assert {p.name for p in new} <= {Path(row.path).name for row in rows}


def raw_upload(client: TestClient, filename: bytes, payload: bytes) -> Response:
    """A multipart upload written by hand, so that ``filename`` reaches the server byte for byte."""
    boundary = b"gtboundary"
    body = (
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n--" + boundary + b"--\r\n"
    )
    return client.post(
        "/v1/files",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=" + boundary.decode()},
    )
