"""The dashboard in headless Chromium against the real service: key, upload, estimate, job, heat map, FLOPs
chart, download, cancel, and a phone-sized screen. Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import io
import math
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.browser.pages import (
    ARTIFACTS,
    DEMO,
    EXAMPLES,
    JOB_TIMEOUT_S,
    JOBS,
    TINY_HP,
    Dashboard,
    Service,
    dashboard_page,
    dataset_lines,
    method,
    upload_dataset,
    wait_job,
)

pytestmark = pytest.mark.timeout(300)


def expect():  # playwright's expect, imported late so a missing playwright fails in a fixture
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect


def precision3(x: float) -> str:
    """``x`` as JavaScript's ``x.toPrecision(3)`` writes a number between 1e-6 and 1."""
    return f"{x:.{2 - math.floor(math.log10(x))}f}"


def test_upload_estimate_train_and_download(dashboard: Dashboard, tmp_path: Path) -> None:
    page, service = dashboard.page, dashboard.service
    check = expect()
    dashboard.open()
    check(page.locator("#key-gate")).to_be_visible()
    dashboard.screenshot("01-key")
    dashboard.sign_in()
    check(page.locator("#jobs-empty, #jobs-table")).to_be_visible()

    # A dataset with a bad line: the error names the line and shows it.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(dataset_lines(2) + '{"prompt": "no completion here"}\n' + dataset_lines(1))
    page.click("a[data-nav=files]")
    page.set_input_files("#dataset-file", str(bad))
    with dashboard.console.expect_http_error(400, "/v1/files"):
        page.click("#upload-button")
        check(page.locator("#upload-error")).to_contain_text("Line 3")
    check(page.locator("#upload-error")).to_contain_text("completion")
    check(page.locator("#bad-lines .bad")).to_have_attribute("data-line", "3")
    check(page.locator("#bad-lines .bad")).to_contain_text("no completion here")
    dashboard.screenshot("02-upload-error")

    good = tmp_path / "arithmetic.jsonl"
    good.write_text(dataset_lines(EXAMPLES))
    page.set_input_files("#dataset-file", str(good))
    page.click("#upload-button")
    check(page.locator("#upload-ok")).to_contain_text(f"{EXAMPLES} examples")
    file_id = page.locator("#upload-ok").get_attribute("data-file-id")
    check(page.locator(f"#files-table tr[data-file-id='{file_id}']")).to_be_visible()

    # New job: the estimate follows the rho slider; rho_min is the slider's minimum.
    page.click("#use-file")
    check(page.locator("#training-file")).to_have_value(file_id)
    check(page.locator("#model")).to_have_value(DEMO)
    check(page.locator("#learning_rate")).to_have_value("auto")  # the default: the service chooses
    for name, value in TINY_HP.items():
        page.fill(f"#{name}", str(value))
        page.locator(f"#{name}").dispatch_event("change")
    estimate = page.locator("#estimate")
    check(estimate).to_contain_text(f"{TINY_HP['n_epochs']} epochs")
    check(estimate).to_have_attribute("data-state", "ok")
    with service.client() as client:
        at_one = client.post(
            "/v1/estimates",
            json={
                "model": DEMO,
                "training_file": file_id,
                "method": method("green", **TINY_HP, rho=1.0),
            },
        ).json()
    rho_min = at_one["rho_min"]
    slider = page.locator("#rho")
    check(slider).to_have_attribute("data-rho-min", str(rho_min), timeout=5000)
    assert float(slider.get_attribute("min")) >= rho_min > float(slider.get_attribute("min")) - 0.01

    slider.focus()
    page.keyboard.press("Home")  # the slider's minimum: rho_min, rounded up to its 0.01 steps
    minimum = slider.get_attribute("min")
    check(page.locator("#rho-value")).to_have_value(minimum)
    check(page.locator("#estimate-table")).to_contain_text(f"rho {float(minimum):.2f}")
    flops_at_min = page.locator("#estimate-flops").inner_text()
    saved_at_min = page.locator("#estimate-saved").inner_text()
    assert float(saved_at_min.rstrip(" %")) > 30  # rho_min 0.57: more than 30 % of the FLOPs saved
    check(page.locator("#rho-summary")).to_contain_text(saved_at_min)
    dashboard.screenshot("03-estimate-at-rho-min")
    page.keyboard.press("End")  # rho = 1: nothing saved
    check(page.locator("#estimate-table")).to_contain_text("rho 1.00")
    check(page.locator("#estimate-saved")).to_have_text("0.0 %")
    assert page.locator("#estimate-flops").inner_text() != flops_at_min
    check(page.locator("#estimate-rho-min")).to_have_text(f"{rho_min:.4f}")

    # A rho below rho_min, typed: the API refuses it and its message is shown.
    with dashboard.console.expect_http_error(400, "/v1/estimates"):
        page.fill("#rho-value", "0.3")
        check(page.locator("#estimate-refused")).to_contain_text("rho_min")
    check(page.locator("#estimate-refused")).to_have_attribute("data-code", "budget_too_small")
    page.fill("#rho-value", "0.75")
    check(page.locator("#estimate-table")).to_contain_text("rho 0.75")
    check(page.locator("#estimate-refused")).to_have_count(0)
    # The form says what "auto" would be at this budget, beside the rate typed.
    with service.client() as client:
        rate = client.post(
            "/v1/estimates",
            json={"model": DEMO, "training_file": file_id, "method": method("green", **TINY_HP, rho=0.75)},
        ).json()["learning_rate"]
    hint = page.locator("#learning-rate-auto")
    check(hint).to_contain_text(f'"auto" = {precision3(rate["auto"])} for this job')
    check(hint).to_contain_text(f"this job: {precision3(TINY_HP['learning_rate'])}")
    check(page.locator("#estimate-learning-rate")).to_have_text(precision3(TINY_HP["learning_rate"]))
    dashboard.screenshot("04-new-job")

    page.click("#create-job")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]

    # The jobs list updates by itself until the job has succeeded.
    page.click("a[data-nav=jobs]")
    row = page.locator(f"#jobs-table tr[data-job-id='{job_id}']")
    check(row).to_be_visible()
    check(row.locator(".badge")).to_have_text("succeeded", timeout=JOB_TIMEOUT_S * 1000)
    check(row).to_contain_text("green")
    check(row).to_contain_text("0.75")
    check(row).to_contain_text("%")
    check(row).to_contain_text("gCO2e")
    dashboard.screenshot("05-jobs")

    row.click()
    check(page.locator("#view")).to_have_attribute("data-status", "succeeded")
    job = wait_job(service, job_id)
    with service.client() as client:
        epochs = client.get(f"{JOBS}/{job_id}/epochs").json()["data"]
        model = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == DEMO)
        checkpoints = client.get(f"{JOBS}/{job_id}/checkpoints").json()["data"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    check(page.locator("#progress-text")).to_contain_text(f"epoch 2/{TINY_HP['n_epochs']}")
    check(page.locator("#stat-saved .value")).to_have_text(f"{100 * job['flops']['saved']:.1f} %")

    # The heat map: one row per tensor of the model, one column per epoch, a filled cell per trained tensor.
    heat = page.locator("#heatmap")
    check(heat).to_be_visible()
    check(heat.locator(".hm-label")).to_have_count(model["tensors"])
    check(heat.locator(".hm-cell")).to_have_count(model["tensors"] * len(epochs))
    check(heat.locator(".hm-cell.on")).to_have_count(sum(len(e["selected_tensors"]) for e in epochs))
    first = epochs[0]["selected_tensors"][0]
    check(heat.locator(f".hm-cell[data-tensor='{first}'][data-epoch='1']")).to_have_attribute(
        "data-trained", "1"
    )
    labels = heat.locator(".hm-label").evaluate_all("cells => cells.map(c => c.title)")
    assert labels == model["tensor_names"]  # model order

    # The FLOPs chart: drawn by Chart.js with the job's and full fine-tuning's FLOPs per epoch.
    chart = page.evaluate(
        "() => { const c = Chart.getChart(document.getElementById('flops-chart'));"
        " return {labels: c.data.labels, sets: c.data.datasets.map(d => [d.label, d.data])}; }"
    )
    assert chart["labels"] == ["epoch 1", "epoch 2"]
    sets = dict((label, data) for label, data in chart["sets"])
    assert sets["full fine-tuning"] == [e["flops"]["full"] for e in epochs]
    spent = [
        sum(sets[k][i] for k in ("forward", "activation gradients", "weight gradients", "tensor selection"))
        for i in range(2)
    ]
    assert spent == [e["flops"]["total"] for e in epochs]
    check(page.locator("#loss-chart")).to_be_visible()
    check(page.locator("#epochs-table tbody tr")).to_have_count(2)
    # Events: oldest first, so the last status event is the newest: succeeded.
    check(page.locator("#events li[data-kind=status]").last).to_contain_text("succeeded")
    check(page.locator("#events li[data-kind=status]").first).to_contain_text("job created")
    # The model the job made.
    assert job["fine_tuned_model"], job
    check(page.locator("#fine-tuned-model")).to_have_text(job["fine_tuned_model"])
    dashboard.screenshot("06-job")

    # A checkpoint: fetched with the Bearer header and saved from a blob.
    final = next(c for c in checkpoints if c["name"] == "final")
    check(page.locator("#checkpoints-table tbody tr")).to_have_count(len(checkpoints))
    names = page.locator("#checkpoints-table tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.checkpoint)"
    )
    assert names == [c["name"] for c in checkpoints]  # newest first, as the API lists them
    check(page.locator("#checkpoints-table tr[data-checkpoint=final]")).to_contain_text(
        final["fine_tuned_model_checkpoint"]
    )
    with page.expect_download() as info:
        page.click(f"button[data-checkpoint-id='{final['id']}']")
    download = info.value
    assert download.suggested_filename == f"{job_id}-final.tar"
    target = ARTIFACTS / download.suggested_filename
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    download.save_as(target)
    data = target.read_bytes()
    assert data[257:262] == b"ustar" or zipfile.is_zipfile(io.BytesIO(data))
    with tarfile.open(target) as archive:
        names = archive.getnames()
    assert f"{job_id}-final/model.safetensors" in names and f"{job_id}-final/config.json" in names
    check(page.locator("#download-note")).to_contain_text("Saved")
    target.unlink()


def test_cancel_button_cancels_a_job(dashboard: Dashboard) -> None:
    page, service = dashboard.page, dashboard.service
    check = expect()
    file_id = upload_dataset(service)
    with service.client() as client:
        body = {
            "model": DEMO,
            "training_file": file_id,
            "method": method("green", **{**TINY_HP, "n_epochs": 100}, rho=0.8),
        }
        job_id = client.post(JOBS, json=body).json()["id"]
    dashboard.sign_in()
    dashboard.open(f"#/jobs/{job_id}")
    button = page.locator("#cancel-job")
    check(button).to_be_visible()
    page.once("dialog", lambda dialog: dialog.accept())
    button.click()
    check(page.locator("#job-header .badge")).to_have_text("cancelled")
    check(button).to_have_count(0)
    assert wait_job(service, job_id, timeout_s=60)["status"] == "cancelled"
    check(page.locator("#events")).to_contain_text("cancelled")
    dashboard.screenshot("07-cancelled")


def test_a_wrong_key_is_refused(dashboard: Dashboard) -> None:
    page = dashboard.page
    check = expect()
    dashboard.open()
    page.fill("#api-key", "gt-not-a-key-000000000000000000")
    with dashboard.console.expect_http_error(401, "/v1/models"):
        page.click("#key-form button[type=submit]")
        check(page.locator("#key-error")).to_contain_text("refused")
    check(page.locator("#nav")).to_be_hidden()
    assert page.evaluate("localStorage.getItem('greentrainer.apiKey')") is None


@pytest.mark.parametrize(
    "fragment,ready",
    [
        ("#/jobs", "#jobs-table"),
        ("#/jobs/{job}", "#heatmap"),
        ("#/new", "#estimate-table"),
        ("#/files", "#files-table"),
    ],
)
def test_phone_viewport_has_no_horizontal_overflow(
    browser,
    service: Service,
    trained_job: dict,
    fragment: str,
    ready: str,
) -> None:
    options = {
        "viewport": {"width": 390, "height": 844},
        "is_mobile": True,
        "has_touch": True,
        "device_scale_factor": 2,
    }
    with dashboard_page(browser, service, **options) as phone:
        phone.sign_in()
        phone.open(fragment.format(job=trained_job["id"]))
        phone.page.wait_for_selector(ready)
        phone.page.wait_for_timeout(300)  # charts and late rows
        width = phone.page.evaluate(
            "() => ({inner: window.innerWidth, doc: document.documentElement.scrollWidth, "
            "body: document.body.scrollWidth})"
        )
        assert width["inner"] == 390
        assert width["doc"] <= width["inner"] and width["body"] <= width["inner"], width
        name = fragment.strip("#/").replace("/{job}", "-job") or "jobs"
        phone.screenshot(f"phone-{name}")
