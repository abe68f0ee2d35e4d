"""The web UI (python -m ip2p.webui): its page, its JSON API against infer.py, and its errors."""

import base64
import io
import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

import infer
from ip2p import webui
from ip2p.models import load_editor


@pytest.fixture(scope="module")
def photo_bytes():
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((24, 32, 3)) * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_editor_dir):
    model = load_editor(tiny_editor_dir, expand=False)
    service = webui.EditorService(model, checkpoint=str(tiny_editor_dir), steps=2, resolution=32)
    server = webui.make_server("127.0.0.1", 0, service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def call(url, body=None, raw=None, headers=None):
    """(status, parsed JSON or text) of a GET (no body) or a POST."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text, kind = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, text, kind = e.code, e.read(), e.headers["Content-Type"]
    return status, json.loads(text) if kind == "application/json" else text.decode()


def raw_answer(url, data: bytes) -> bytes:
    """Everything the server answers to ``data`` sent as raw bytes on one connection, until it closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: connection.recv(65536), b""))


def raw(url, data: bytes):
    """(status, parsed JSON) of a request sent as raw bytes (what urllib would refuse to send)."""
    answer = raw_answer(url, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), answer[:300]
    return int(head.split()[1]), json.loads(body) if body else None


def post(body: bytes, content_length: bytes | None = None) -> bytes:
    length = str(len(body)).encode() if content_length is None else content_length
    return (b"POST /edit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + length
            + b"\r\n\r\n" + body)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def decode(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))))


def test_page_and_info(server, tiny_editor_dir):
    status, page = call(server + "/")
    assert status == 200 and "<form" in page and "/edit" in page and "Random CFG" in page
    # JS numbers hold integers exactly to 2**53 - 1: the browser refuses a larger seed rather than send a rounded one
    assert re.search(r'id="seed"[^>]* max="%d"' % (2**53 - 1), page)
    status, info = call(server + "/info")
    assert status == 200 and info["checkpoint"] == str(tiny_editor_dir)
    assert info["defaults"]["steps"] == 2 and info["random_text_guidance"] == [6.0, 9.0]
    assert info["low_memory"] is False  # infer.py --low-memory differs by rounding: the page says which it runs


def test_an_edit_is_the_picture_infer_py_makes_with_the_same_settings(server, tiny_editor_dir, photo_bytes,
                                                                      tmp_path):
    status, out = call(server + "/edit", {"image": data_url(photo_bytes), "instruction": "make it winter",
                                          "steps": 3, "seed": 7, "text_guidance": 5, "image_guidance": 1.3})
    assert status == 200, out
    assert (out["seed"], out["steps"], out["text_guidance"], out["image_guidance"]) == (7, 3, 5.0, 1.3)
    photo = tmp_path / "in.png"
    photo.write_bytes(photo_bytes)
    assert infer.main(["--checkpoint", str(tiny_editor_dir), "--image", str(photo), "--instruction",
                       "make it winter", "--steps", "3", "--seed", "7", "--text-guidance", "5", "--image-guidance",
                       "1.3", "--resolution", "32", "--output", str(tmp_path / "out.png"), "--quiet"]) == 0
    assert np.array_equal(decode(out["image"]), np.asarray(Image.open(tmp_path / "out.png")))
    assert out["size"] == [32, 24]


PAGE_HARNESS = r"""
const els = {};
const el = id => els[id] || (els[id] = {value: '', checked: id === 'randomize_seed', textContent: '', files: [{}],
  listeners: {}, addEventListener(type, f) { this.listeners[type] = f; }});
global.document = {getElementById: el};
global.FileReader = class { readAsDataURL() { this.result = 'data:image/png;base64,AAAA'; this.onload(); } };
global.fetch = async url => url === '/info' ? {ok: false, json: async () => ({error: 'loading'})}
  : {ok: true, json: async () => JSON.parse(process.argv[1])};
eval(require('fs').readFileSync(0, 'utf8'));
el('file').listeners.change();
el('instruction').value = 'make it winter';
el('form').listeners.submit({preventDefault() {}}).then(() => console.log(el('caption').textContent));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_the_page_shows_every_setting_infer_py_needs(server, photo_bytes):
    """The page's script, run by node against a stand-in DOM: the caption under an edit names every setting that
    ``infer.py`` needs to make the same picture, the resolution included."""
    status, out = call(server + "/edit", {"image": data_url(photo_bytes), "instruction": "make it winter", "seed": 7,
                                          "resolution": 0})
    assert status == 200, out
    script = webui.PAGE.partition("<script>")[2].partition("</script>")[0]
    caption = subprocess.run(["node", "-e", PAGE_HARNESS, "--", json.dumps(out)], input=script, text=True,
                             capture_output=True, check=True, timeout=60).stdout
    for setting in ("s_T=7.5", "s_I=1.5", "seed 7", "2 euler_a steps", "resolution 0", "32x24"):
        assert setting in caption, caption


def test_random_seed_and_cfg_are_reported(server, photo_bytes):
    status, out = call(server + "/edit", {"image": data_url(photo_bytes), "instruction": "x", "seed": None,
                                          "randomize_cfg": True})
    assert status == 200, out
    assert isinstance(out["seed"], int) and 6.0 <= out["text_guidance"] <= 9.0 and 1.2 <= out["image_guidance"] <= 1.8
    # Plain base64 (no data URL prefix) is accepted too; the result can be sent back for a further edit.
    status, again = call(server + "/edit", {"image": out["image"].partition(",")[2], "instruction": "x", "seed": 1})
    assert status == 200 and decode(again["image"]).shape == (24, 32, 3)


@pytest.mark.parametrize("body, message", [
    ({"instruction": "x"}, "image is missing"),
    ({"image": "data:image/png;base64,@@@", "instruction": "x"}, "image is not valid base64"),
    ({"image": base64.b64encode(b"not an image").decode(), "instruction": "x"},
     "'the uploaded image' is not an image PIL can read"),
    ({"image": "", "instruction": "x"}, "image is missing"),
    ({"image": "IMAGE", "instruction": "  "}, "instruction is missing or empty"),
    ({"image": "IMAGE", "instruction": "x", "steps": 0}, "steps=0 must be at least 1"),
    ({"image": "IMAGE", "instruction": "x", "steps": 2.5}, "steps=2.5 must be an integer"),
    ({"image": "IMAGE", "instruction": "x", "text_guidance": "high"}, "text_guidance='high' must be a number"),
    ({"image": "IMAGE", "instruction": "x", "seed": -1}, "seed=-1 must be at least 0"),
    ({"image": "IMAGE", "instruction": "x", "resolution": 1}, "resolution=1 is below"),
    ({"image": "IMAGE", "instruction": "x", "resolution": 16000}, "over the limit of"),
    (["not", "an", "object"], "must be a JSON object"),
    ({"image": "IMAGE", "instruction": "x", "randomize_cfg": "false"}, "randomize_cfg='false' must be true or false"),
    ({"image": "IMAGE", "instruction": "a\ud800"}, "instruction 'a\\ud800' is not valid UTF-8 text"),
    ({"image": "IMAGE", "instruction": "x", "image_guidance": 1e300}, "the edit came out as NaN"),
])
def test_bad_requests_are_one_line_4xx_errors(server, photo_bytes, body, message):
    if isinstance(body, dict) and body.get("image") == "IMAGE":
        body = dict(body, image=data_url(photo_bytes))
    status, out = call(server + "/edit", body)
    assert status == 400 and message in out["error"] and "\n" not in out["error"], out


def test_not_json_unknown_paths_and_oversized_requests(server, monkeypatch):
    status, out = call(server + "/edit", raw=b"{nope")
    assert status == 400 and "the request is not JSON" in out["error"]
    assert call(server + "/nowhere")[0] == 404 and call(server + "/nowhere", {})[0] == 404
    monkeypatch.setattr(webui, "MAX_REQUEST_BYTES", 10)
    status, out = call(server + "/edit", {"image": "x" * 20, "instruction": "x"})
    assert status == 413 and "over the limit of 10" in out["error"]


def test_numbers_past_float_range_and_unparsable_bodies_are_answered_with_4xx(server, photo_bytes):
    # Each of these used to end the connection without an answer, or answer 500.
    body = {"image": data_url(photo_bytes), "instruction": "x"}
    for key in ("seed", "steps", "resolution", "text_guidance"):
        status, out = call(server + "/edit", dict(body, **{key: 10**400}))
        assert status == 400 and f"{key}=1000" in out["error"] and "must be" in out["error"], out
    status, out = call(server + "/edit", dict(body, seed=2**64))
    assert status == 400 and "must be at most 18446744073709551615" in out["error"]
    status, out = raw(server, post(b'{"instruction": "x", "seed": 1' + b"0" * 5000 + b"}"))
    assert status == 400 and "the request is not JSON" in out["error"] and "\n" not in out["error"]
    status, out = raw(server, post(b"[" * 100000 + b"]" * 100000))
    assert status == 400 and "the request is not JSON" in out["error"]
    status, out = raw(server, post(b"{}", content_length=b"\xb2"))  # latin-1 '2' superscript: isdigit() but not int()
    assert status == 411 and "Content-Length" in out["error"]
    status, out = raw(server, post(b"{}", content_length=b"9" * 5000))  # int() refuses over 4300 digits
    assert status == 413 and "over the limit of" in out["error"], out
    status, out = raw(server, post(b"{}", content_length=b"0" * 5000 + b"2"))
    assert status == 400 and "instruction is missing" in out["error"], out


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"PUT /edit HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 501, "method PUT is not supported"),
    (b"OPTIONS / HTTP/1.1\r\n\r\n", 501, "method OPTIONS is not supported"),
    (b"GET / extra HTTP/1.1\r\n\r\n", 400, "Bad request syntax"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "Request-URI Too Long"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431, "Too many headers"),
], ids=["put", "options", "garbled", "long-line", "many-headers"])
def test_requests_http_server_cannot_route_get_one_line_json_too(server, request_bytes, status, message):
    got, out = raw(server, request_bytes)
    assert got == status and message in out["error"] and "\n" not in out["error"], out  # not the base class's HTML


def test_head_answers_with_gets_status_and_headers_and_no_body(server):
    def answer(method: bytes, path: bytes) -> tuple[bytes, bytes]:
        head, _, body = raw_answer(server, method + b" " + path + b" HTTP/1.1\r\nConnection: close\r\n\r\n") \
            .partition(b"\r\n\r\n")
        return head, body

    for path, status in ((b"/", b"200"), (b"/info", b"200"), (b"/nope", b"404")):
        head, body = answer(b"HEAD", path)
        assert head.split()[1] == status and body == b"", head
    length = re.compile(rb"Content-Length: (\d+)")
    assert length.search(answer(b"HEAD", b"/")[0]).group(1) == length.search(answer(b"GET", b"/")[0]).group(1)


def test_a_body_the_server_does_not_read_is_never_taken_for_the_next_request(server):
    # A GET's body, then a second GET on the same connection: "helloGET /info ..." must not be served (nor refused).
    answer = raw_answer(server, b"GET /info HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
                                b"GET /info HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert re.findall(rb"HTTP/1.1 (\d+) ", answer)[1:] in ([], [b"200"]), answer
    # Chunked framing overrides Content-Length: reading 2 bytes of it would serve the rest as a smuggled request.
    answer = raw_answer(server, b"POST /edit HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n{}GET /info HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert re.findall(rb"HTTP/1.1 (\d+) ", answer) == [b"400"] and b"Transfer-Encoding" in answer, answer


def test_a_client_that_leaves_before_its_answer_is_no_error(server, photo_bytes, caplog, capfd):
    caplog.set_level(logging.INFO, logger="ip2p.webui")
    body = json.dumps({"image": data_url(photo_bytes), "instruction": "x", "seed": 1}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(post(body))
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    deadline = time.monotonic() + 60
    while ("edited" not in caplog.text or any("process_request" in t.name for t in threading.enumerate())) and \
            time.monotonic() < deadline:
        time.sleep(0.05)  # until the server has made the edit and tried to send it
    assert "edit failed" not in caplog.text and "Traceback" not in capfd.readouterr().err
    assert call(server + "/edit", json.loads(body))[0] == 200


def test_a_port_in_use_fails_before_the_model_loads(caplog, monkeypatch):
    from ip2p import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load when the port cannot be used")

    monkeypatch.setattr(models, "load_editor", no_load)
    taken = webui.make_server("127.0.0.1", 0)
    try:
        assert webui.main(["--port", str(taken.server_address[1]), "--checkpoint", "nowhere"]) == 2
    finally:
        taken.server_close()
    assert "cannot listen on 127.0.0.1:" in caplog.text and "pass another --port" in caplog.text


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, caplog):
    assert webui.main(["--port", "0", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "error:" in caplog.text


def test_steps_the_sampler_cannot_take_are_a_4xx_error_not_a_failed_edit(tiny_editor_dir, photo_bytes):
    service = webui.EditorService(load_editor(tiny_editor_dir, expand=False), scheduler="ddim", resolution=16)
    with pytest.raises(webui.RequestError, match="steps=1000 is too many for the DDIMScheduler sampler") as caught:
        service.edit({"image": data_url(photo_bytes), "instruction": "x", "steps": 1000})
    assert caught.value.status == 400


def test_an_instruction_longer_than_the_text_encoder_reads_comes_back_with_a_warning(tiny_editor_dir, photo_bytes):
    service = webui.EditorService(load_editor(tiny_editor_dir, expand=False), steps=1, resolution=16)
    out = service.edit({"image": data_url(photo_bytes), "instruction": "make it winter " + "and snowy " * 60})
    assert "reads only the first 77" in out["warning"] and out["image"].startswith("data:image/png")
    assert "warning" not in service.edit({"image": data_url(photo_bytes), "instruction": "make it winter"})


def reset(connection: socket.socket) -> None:
    """Close ``connection`` with a reset (RST), as a crashed client or a tab closed mid-upload does."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


@pytest.mark.parametrize("when", ["mid-upload", "after-its-answer"])
def test_a_client_that_resets_its_connection_is_no_traceback(server, photo_bytes, capfd, when):
    body = json.dumps({"image": data_url(photo_bytes), "instruction": "x", "seed": 1}).encode()
    host, port = server.removeprefix("http://").split(":")
    capfd.readouterr()
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        if when == "mid-upload":  # the server is reading the body when the reset comes
            connection.sendall(post(body)[:-len(body) // 2])
            time.sleep(0.2)
        else:  # the server has answered and waits for the next request on the kept-alive connection
            connection.sendall(post(body))
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                    re.search(rb"Content-Length: (\d+)", answer).group(1)):
                answer += connection.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
        reset(connection)
    deadline = time.monotonic() + 60
    while any("process_request" in t.name for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Traceback" not in capfd.readouterr().err
    assert call(server + "/info")[0] == 200


def test_base64_wrapped_in_lines_is_the_same_image(server, photo_bytes):
    # What `base64 in.png`, Python's base64.encodebytes and MIME give: lines of 76 characters.
    body = {"instruction": "x", "seed": 3}
    status, plain = call(server + "/edit", dict(body, image=base64.b64encode(photo_bytes).decode()))
    assert status == 200, plain
    for wrapped in (base64.encodebytes(photo_bytes).decode(), base64.encodebytes(photo_bytes).decode()
                    .replace("\n", "\r\n"), "data:image/png;base64,\n" + base64.encodebytes(photo_bytes).decode()):
        status, out = call(server + "/edit", dict(body, image=wrapped))
        assert status == 200 and out["image"] == plain["image"], out


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "ddim", "--steps", "1000"], "steps=1000 is too many for the DDIMScheduler sampler"),
    (["--resolution", "1"], "resolution=1 is below 2"),
])
def test_defaults_no_edit_can_use_fail_at_start_not_in_every_edit(tiny_editor_dir, caplog, monkeypatch, flags,
                                                                   message):
    def no_serve(self, *args, **kwargs):
        raise AssertionError("the server must not start with defaults every edit of the page would refuse")

    monkeypatch.setattr(webui._Server, "serve_forever", no_serve)
    assert webui.main(["--port", "0", "--checkpoint", str(tiny_editor_dir), *flags]) == 2
    assert message in caplog.text


def test_edits_are_taken_as_json_only_so_other_sites_cannot_post_them(server, photo_bytes):
    # A page of any site may send text/plain or a form to localhost without the browser asking (no CORS preflight);
    # application/json needs the preflight, which this server never grants.
    body = {"image": data_url(photo_bytes), "instruction": "make it red", "steps": 1}
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        status, answer = call(server + "/edit", body, headers={"Content-Type": kind} if kind else {"X": "y"})
        assert status == 415 and "Content-Type: application/json" in answer["error"], (kind, answer)
    status, answer = call(server + "/edit", body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200 and answer["image"].startswith("data:image/png;base64,")


def test_edits_past_the_pending_limit_are_answered_503_at_once(tiny_editor_dir, photo_bytes, monkeypatch):
    """Each taken edit holds its upload and image while it waits for the one running: past the limit the server
    answers at once, so no number of clients can make it hold more; the edits it took still finish."""
    monkeypatch.setattr(webui, "MAX_PENDING_EDITS", 2)
    service = webui.EditorService(load_editor(tiny_editor_dir, expand=False), steps=2, resolution=32)
    server = webui.make_server("127.0.0.1", 0, service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/edit"
    body = {"image": data_url(photo_bytes), "instruction": "make it winter", "seed": 1}
    answers = []
    try:
        with service._lock:  # an edit running: the taken ones wait
            takers = [threading.Thread(target=lambda: answers.append(call(url, body))) for _ in range(2)]
            for thread in takers:
                thread.start()
            deadline = time.monotonic() + 30
            while server.pending._value and time.monotonic() < deadline:
                time.sleep(0.01)
            status, out = call(url, body)
            assert status == 503 and "already has 2 edits in hand" in out["error"], out
            assert answers == []
        for thread in takers:
            thread.join(60)
        assert [status for status, _ in answers] == [200, 200]
        assert call(url, body)[0] == 200  # the slots are given back
    finally:
        server.shutdown()
        server.server_close()


def test_an_edit_past_the_pending_limit_or_of_another_type_gets_its_answer_while_uploading_a_large_image():
    """The 503 must reach a client that is still sending a body of a few MB: closing with the body unread resets the
    connection, and the page would say the server did not answer."""
    server = webui.make_server("127.0.0.1", 0, None)
    server.pending = threading.BoundedSemaphore(1)
    server.pending.acquire()  # every slot taken
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/edit"
        status, out = call(url, {"image": "A" * 4_000_000, "instruction": "x"})
        assert status == 503 and "edits in hand" in out["error"], out
        # the same for a large upload of another content type, refused before the pending limit
        status, out = call(url, raw=b"A" * 4_000_000, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 415 and "Content-Type: application/json" in out["error"], out
    finally:
        server.shutdown()
        server.server_close()
