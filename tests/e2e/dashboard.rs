//! Browser tests of the dashboard (headless Chromium via chromedriver).

use crate::harness::*;

/// The browser harness itself works: Chromium loads a local page and runs its script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_runs_local_pages() {
    let dir = TestDir::new("chromium-smoke");
    let (port, _pages) = serve_pages(vec![], "<html><body><p id=x>a</p><script>document.getElementById('x').textContent='ran'</script></body></html>".into()).await;
    let b = Browser::start(&dir).await;
    b.client
        .goto(&format!("http://127.0.0.1:{port}/event/anything"))
        .await
        .unwrap();
    let text = b
        .client
        .find(fantoccini::Locator::Id("x"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "ran");
    b.close().await;
}
