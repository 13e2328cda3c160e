"""The Files API driven by the official ``openai`` client, on both backends: upload, list, retrieve, content,
delete; tenancy, keys, and files that jobs use."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from api.db import SessionFactory
from api.routes import files as files_routes
from api.states import JobState, transition
from api.tables import File, Job
from tests.service.service_calls import DEMO, SMALL_EXAMPLES, SMALL_HP, SMALL_RHO, dataset_lines, new_key


def openai_client(app, key: str) -> openai.OpenAI:
    """The official client, talking to the app in this process (TestClient is an httpx.Client)."""
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=TestClient(app))


def stored_path(settings, sessions: SessionFactory, file_id: str):
    with sessions() as session:
        row = session.get(File, file_id)
        assert row is not None
        return settings.artifacts_dir / row.path


def test_upload_list_retrieve_download_delete(app, settings, sessions: SessionFactory, key: str) -> None:
    client = openai_client(app, key)
    data = dataset_lines(5).encode()
    created = client.files.create(file=("train.jsonl", data, "application/jsonl"), purpose="fine-tune")
    assert (created.object, created.filename, created.purpose, created.bytes) == (
        "file",
        "train.jsonl",
        "fine-tune",
        len(data),
    )
    assert created.status == "processed"
    assert [f.id for f in client.files.list()] == [created.id]
    assert client.files.retrieve(created.id).bytes == len(data)

    content = client.files.content(created.id)
    assert content.read() == data
    assert content.response.headers["content-length"] == str(len(data))
    assert content.response.headers["content-type"].startswith("application/jsonl")

    path = stored_path(settings, sessions, created.id)
    assert path.is_file()
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert not path.exists()  # the stored bytes go with the row
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created.id)
    assert list(client.files.list()) == []


def test_content_is_byte_exact_and_names_the_upload(app, key: str) -> None:
    client = openai_client(app, key)
    # A byte-order mark, CRLF line ends and non-ASCII text: sent back untouched.
    data = (
        "\ufeff".encode()
        + dataset_lines(3).replace("\n", "\r\n").encode()
        + '{"prompt": "é", "completion": "日本"}\n'.encode()
    )
    created = client.files.create(file=("données (v2).jsonl", data, "application/jsonl"), purpose="fine-tune")
    response = client.files.with_raw_response.content(created.id)
    assert response.http_response.content == data
    disposition = response.headers["content-disposition"]
    assert f'filename="{created.id}.jsonl"' in disposition
    assert "filename*=UTF-8''donn%C3%A9es%20%28v2%29.jsonl" in disposition


def test_content_streams_without_holding_a_database_connection(app, key: str, monkeypatch) -> None:
    engine = app.state.session_factory.kw["bind"]
    held: list[int] = []
    read_all = files_routes._read_all

    def watched(handle, size: int):
        for chunk in read_all(handle, size):
            held.append(engine.pool.checkedout())  # connections out of the pool while a chunk is sent
            yield chunk

    monkeypatch.setattr(files_routes, "_read_all", watched)
    client = openai_client(app, key)
    data = dataset_lines(3).encode()
    file_id = client.files.create(file=("train.jsonl", data, "application/jsonl"), purpose="fine-tune").id
    assert client.files.content(file_id).read() == data
    assert held and set(held) == {0}


def test_another_tenants_file_is_not_found(app, sessions: SessionFactory, key: str) -> None:
    owner = openai_client(app, key)
    other = openai_client(app, new_key(sessions))
    file_id = owner.files.create(
        file=("train.jsonl", dataset_lines(3).encode(), "application/jsonl"), purpose="fine-tune"
    ).id
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(file_id)
    assert list(other.files.list()) == []
    assert owner.files.content(file_id).read() == dataset_lines(3).encode()  # untouched


def upload(client: openai.OpenAI, examples: int, name: str = "train.jsonl") -> str:
    return client.files.create(
        file=(name, dataset_lines(examples).encode(), "application/jsonl"), purpose="fine-tune"
    ).id


def test_a_file_used_by_a_job_cannot_be_deleted(app, sessions: SessionFactory, key: str) -> None:
    client = openai_client(app, key)
    train, valid, spare = (upload(client, n, f"{n}.jsonl") for n in (SMALL_EXAMPLES, 4, 3))
    hp = {**SMALL_HP, "rho": SMALL_RHO}
    job = client.fine_tuning.jobs.create(
        model=DEMO,
        training_file=train,
        validation_file=valid,
        method={"type": "green", "green": {"hyperparameters": hp}},  # a type beyond OpenAI's own
    )
    assert job.status == "queued"

    for file_id, role in ((train, "training_file"), (valid, "validation_file")):
        with pytest.raises(openai.ConflictError) as queued:
            client.files.delete(file_id)
        assert queued.value.status_code == 409
        assert f"{role} of job {job.id}, which is queued" in queued.value.message
        assert client.files.retrieve(file_id).id == file_id  # nothing deleted
    assert client.files.delete(spare).deleted is True  # a file no job uses is free to go

    # A finished job keeps its references to its files (jobs.training_file is a non-null foreign key to
    # files): the files stay, and so does the job's record.
    with sessions() as session:
        row = session.get(Job, job.id)
        assert row is not None
        transition(session, row, JobState.cancelled)
        session.commit()
    # Once the job has ended, the file can go: the job's record keeps its id, the file answers 404.
    assert client.files.delete(train).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(train)
    with pytest.raises(openai.NotFoundError):
        client.files.content(train)
    assert train not in [f.id for f in client.files.list()]
    assert client.fine_tuning.jobs.retrieve(job.id).training_file == train


def test_a_bad_key_is_refused(app) -> None:
    client = openai_client(app, "gt-not-a-key-at-all-000000000000")
    for call in (client.files.list, lambda: client.files.content("file-01m8hk9pxzykb66z7e98q3706e")):
        with pytest.raises(openai.AuthenticationError):
            call()
    with pytest.raises(openai.AuthenticationError):
        client.files.delete("file-01m8hk9pxzykb66z7e98q3706e")
