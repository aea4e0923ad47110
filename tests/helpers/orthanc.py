"""A real DICOMweb archive for the tests: Debian's Orthanc with its DICOMweb plugin, on loopback.

`start_orthanc(folder)` starts one in `folder` (its own JSON config, storage and log) on a free port with the DICOM
port off, remote access off, and an HTTP request filter (a Lua script) that admits only the test's basic-auth user
or its bearer token and logs every request it admits. `Orthanc.stop()` ends it by its PID. The pytest fixture
`orthanc` (tests/conftest.py) gives each test a fresh, empty archive; it skips, saying why, only where the Debian
packages are not installed (`make orthanc` installs them).

Server-side request log: `Orthanc.requests()` lists the (method, uri) pairs Orthanc admitted, so a test can count
the WADO-RS fetches that really reached the archive.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ORTHANC_BINARY_NAMES = ("Orthanc",)
PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
USER = "cxr-test"
PASSWORD = "not-a-real-secret"
TOKEN = "test-bearer-token"
_LOG_MARK = "cxr-request"

# Orthanc calls this for every HTTP request before it serves it; `print` goes to Orthanc's log file.
_FILTER = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  local auth = httpHeaders['authorization']
  if auth ~= '{basic}' and auth ~= '{bearer}' then
    return false
  end
  print('{mark} ' .. method .. ' ' .. uri)
  if {delay} > 0 and method == 'GET' and string.find(uri, '/instances/', 1, true) then
    local start = os.clock()  -- a slow archive: each instance fetch takes {delay} s (CPU time, busy)
    while os.clock() - start < {delay} do end
  end
  return true
end
"""


def find_orthanc() -> tuple[str | None, str | None, str]:
    """(Orthanc binary, DICOMweb plugin, '') when both are installed, else (None, None, why not)."""
    binary = next((b for b in map(shutil.which, ORTHANC_BINARY_NAMES) if b), None)
    if binary is None and Path("/usr/sbin/Orthanc").is_file():
        binary = "/usr/sbin/Orthanc"
    if binary is None:
        return None, None, "Orthanc is not installed (Debian package 'orthanc'; run `make orthanc`)"
    plugin = next((p for p in PLUGIN_PATHS if Path(p).is_file()), None)
    if plugin is None:
        return None, None, "Orthanc's DICOMweb plugin is not installed (Debian package 'orthanc-dicomweb')"
    return binary, plugin, ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def basic_header(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Orthanc:
    """A running loopback Orthanc: its URLs, credentials, folder and process."""

    port: int
    folder: Path
    process: subprocess.Popen = field(repr=False)
    user: str = USER
    password: str = PASSWORD
    token: str = TOKEN

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def get_json(self, path: str) -> object:
        """GET a REST path of Orthanc's own API (e.g. '/instances') as JSON, with the basic-auth user."""
        req = urllib.request.Request(self.url + path, headers={"Authorization": basic_header(self.user, self.password)})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def client(self, auth: str = "basic"):
        """A dicomweb_client.DICOMwebClient on this archive, with basic auth ('basic') or the bearer token."""
        import requests
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        if auth == "basic":
            session = create_session_from_user_pass(self.user, self.password)
        else:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.token}"
        return DICOMwebClient(url=self.dicomweb_url, session=session)

    def requests(self) -> list[tuple[str, str]]:
        """Every (method, uri) this Orthanc admitted so far, in order (read from its log)."""
        if not self.log_path.is_file():
            return []
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if _LOG_MARK in line:
                parts = line.split(_LOG_MARK, 1)[1].split()
                if len(parts) >= 2:
                    out.append((parts[0], parts[1]))
        return out

    def stop(self, kill: bool = False) -> None:
        """End the server by its PID: SIGTERM (Orthanc's clean shutdown takes ~2 s), then SIGKILL after 10 s;
        `kill=True` sends SIGKILL at once (a throwaway archive whose folder is deleted anyway)."""
        if self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def write_config(folder: Path, port: int, plugin: str, delay: float = 0.0) -> Path:
    """Orthanc's JSON config for a private loopback archive in `folder`; `delay` seconds per WADO-RS instance."""
    lua = folder / "filter.lua"
    lua.write_text(
        _FILTER.replace("{basic}", basic_header())
        .replace("{bearer}", f"Bearer {TOKEN}")
        .replace("{mark}", _LOG_MARK)
        .replace("{delay}", repr(float(delay)))
    )
    config = {
        "Name": "cxr-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "Plugins": [plugin],
        "LuaScripts": [str(lua)],
        "HttpServerEnabled": True,
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # loopback clients only
        "AuthenticationEnabled": False,  # the Lua filter above asks for the user or the token instead
        "DicomServerEnabled": False,
        "WebDavEnabled": False,
        "OrthancExplorerEnabled": False,
        "HttpThreadsCount": 8,
        "ConcurrentJobs": 1,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Host": f"127.0.0.1:{port}"},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_orthanc(folder: str | Path, timeout: float = 30.0, delay: float = 0.0) -> Orthanc:
    """Start a loopback Orthanc with the DICOMweb plugin in `folder` and wait until its DICOMweb API answers.
    `delay`: seconds each WADO-RS instance fetch takes (a slow archive, for kill-and-resume tests).

    Raises RuntimeError (with the end of its log) when it does not come up, FileNotFoundError when the Debian
    packages are missing."""
    binary, plugin, why = find_orthanc()
    if binary is None or plugin is None:
        raise FileNotFoundError(why)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between the probe and Orthanc's bind: try another
        port = free_port()
        config = write_config(folder, port, plugin, delay)
        log = folder / "orthanc.log"
        proc = subprocess.Popen(
            [binary, f"--logfile={log}", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        server = Orthanc(port=port, folder=folder, process=proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                server.get_json("/system")
                urllib.request.urlopen(
                    urllib.request.Request(server.dicomweb_url + "/studies", headers={"Authorization": basic_header()}),
                    timeout=5,
                ).read()
                return server
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last_error = str(e)
                time.sleep(0.1)
        server.stop()
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        last_error = f"{last_error}; log: {tail}"
    raise RuntimeError(f"Orthanc did not start in {folder}: {last_error}")


if __name__ == "__main__":  # python tests/helpers/orthanc.py FOLDER: a loopback archive to try the DICOMweb commands
    import sys

    server = start_orthanc(sys.argv[1] if len(sys.argv) > 1 else "orthanc-data")
    print(f"Orthanc (pid {server.process.pid}) at {server.dicomweb_url}  user {server.user}  "
          f"password {server.password}  (Ctrl-C stops it)", flush=True)  # fmt: skip
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
