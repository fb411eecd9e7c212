//! End to end in a real browser: headless Chromium (through chromedriver) opens plugd's
//! dashboard against a real plugd, is refused with a wrong token, lists the plugins with
//! their states, stops and starts one by clicking, sees a crash move the restart count,
//! and installs an uploaded archive, following its job to success.

mod kit;

use std::path::Path;

use kit::browser::Browser;
use kit::daemon::*;

const TOKEN: &str = "dashboard-test-token-0123456789";

/// The state cell of `plugin`'s row, as the page shows it.
fn state_is(plugin: &str, state: &str) -> String {
    format!(
        "const c = document.querySelector('tr[data-plugin=\"{plugin}\"] td.state'); return !!c && c.textContent === '{state}';"
    )
}

/// A `.tar.gz` holding the plugin folder `greeter-1.0.0` (the echo binary as bin/greeter).
fn greeter_archive(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("greeter-1.0.0");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::copy(bin_dir().join("echo"), src.join("bin/greeter")).unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        "name = \"greeter\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"bin/greeter\"\n",
    )
    .unwrap();
    let archive = dir.join("greeter-1.0.0.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&archive).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all("greeter-1.0.0", &src).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    archive
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    add_plugin(&plugins, "echo", "echo", "");
    add_plugin(&plugins, "crasher", "crasher", "");
    // A hostile plugin whose load failure is HTML: the page must show it as text.
    let xss = plugins.join("xss");
    std::fs::create_dir_all(&xss).unwrap();
    std::fs::write(
        xss.join("plugin.toml"),
        "name = \"xss\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"main.py\"\n",
    )
    .unwrap();
    std::fs::write(
        xss.join("main.py"),
        "from plugd_plugin import Plugin, PluginError, serve\n\nclass X(Plugin):\n    def on_load(self, config):\n        raise PluginError('<img id=pwn src=x onerror=\"document.title=1\">')\n\nserve(X())\n",
    )
    .unwrap();
    std::fs::write(root.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        root.path().join("extra.toml"),
        format!("[http]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"token\"\n"),
    )
    .unwrap();
    let d = Plugd::start_with(root, &[]);
    eventually("plugins ready", || d.all_ready(&["echo", "crasher"]));
    let b = Browser::start();
    b.goto(&format!("http://127.0.0.1:{port}/"));

    // The page asks for the token; a wrong one is refused, in words.
    b.wait("the token prompt", "return !document.getElementById('login').hidden");
    b.type_into("#token", "not-the-token-at-all");
    b.click("#login-submit");
    b.wait(
        "the refusal",
        "return document.getElementById('login-error').textContent.includes('Wrong token')",
    );
    assert_eq!(b.js("return document.getElementById('app').hidden"), true);

    // The right one: the table lists the plugins with their states.
    b.js("document.getElementById('token').value = ''");
    b.type_into("#token", TOKEN);
    b.click("#login-submit");
    b.wait("echo ready in the table", &state_is("echo", "ready"));
    b.wait("crasher ready in the table", &state_is("crasher", "ready"));
    b.wait(
        "the hostile plugin's failure shown as text",
        "const c = document.querySelector('tr[data-plugin=\"xss\"] td.exit'); return !!c && c.textContent.includes('<img id=pwn');",
    );
    assert_eq!(
        b.js("return document.getElementById('pwn') === null && document.title === 'plugd'"),
        true
    );
    assert_eq!(
        b.js("return sessionStorage.getItem('plugd-token') !== null && !location.href.includes('token')"),
        true,
        "the token is kept for the tab, never in the URL"
    );

    // Stop and start by clicking.
    b.click("button[data-plugin='echo'][data-action='stop']");
    b.wait("echo stopped", &state_is("echo", "stopped"));
    assert!(d.plugin("echo")["pid"].is_null(), "plugd stopped it");
    b.click("button[data-plugin='echo'][data-action='start']");
    b.wait("echo ready again", &state_is("echo", "ready"));

    // A crash: the restart count in the row moves.
    let _ = d.ctl(&["call", "crasher", "crash", "\"abort\""]);
    b.wait(
        "the restart count moves",
        "const c = document.querySelector('tr[data-plugin=\"crasher\"] td.restarts'); return !!c && Number(c.textContent) >= 1;",
    );

    // Install an uploaded archive; the job is followed to success, and the plugin appears.
    let src = tempfile::tempdir().unwrap();
    let archive = greeter_archive(src.path());
    b.type_into("#install-file", archive.to_str().unwrap());
    b.click("#install-submit");
    b.wait("the jobs page", "return location.hash === '#jobs'");
    b.wait(
        "the install job succeeded",
        "const r = document.querySelector('#jobs tbody tr'); return !!r && r.querySelector('td.state').textContent === 'succeeded';",
    );
    b.wait(
        "the job's output is shown",
        "return document.getElementById('job-title').textContent.includes('succeeded')",
    );
    assert_eq!(d.plugin("greeter")["state"], "ready");
    b.goto(&format!("http://127.0.0.1:{port}/#plugins"));
    b.wait("greeter in the table", &state_is("greeter", "ready"));

    // A picture of it, for the README (PLUGD_SCREENSHOT=1 writes docs/dashboard.png).
    b.click("tr[data-plugin='echo'] a.name");
    b.wait("echo's detail", "return document.getElementById('detail-logs').textContent.length > 0");
    let shot = if std::env::var_os("PLUGD_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png")
    };
    b.screenshot(&shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a real picture");
}
