//! Browser tests of the dashboard (headless Chromium via chromedriver) on the whole pipeline.
//!
//! The page is opened with the credentials in the URL fragment, as a person following a shared
//! link would. The numbers it shows are compared with numbers worked out by hand in
//! `api_contract::send_known_facts`, the charts are checked in the DOM (SVG shapes carrying the
//! data) and in a screenshot (coloured chart strokes in the chart rectangles).

use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use serde_json::Value;

use crate::api_contract::{send_known_facts, start_pipeline, Known};
use crate::harness::*;

/// Opens the dashboard for `client`/`token` and waits until it has rendered or failed.
async fn open(b: &Browser, api_url: &str, client: &str, token: &str) -> String {
    // about:blank first, so that only the fragment changing still loads the page afresh.
    b.client.goto("about:blank").await.expect("about:blank");
    b.client.goto(&format!("{api_url}/#client={client}&token={token}")).await.expect("open dashboard");
    wait_state(&b.client).await
}

/// Waits until `body[data-state]` is `ready` or `error`, and returns it.
async fn wait_state(c: &Client) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = c.execute("return document.body.getAttribute('data-state');", vec![]).await.expect("script");
        let state = state.as_str().unwrap_or("").to_owned();
        if state == "ready" || state == "error" {
            return state;
        }
        assert!(Instant::now() < deadline, "dashboard stuck in state {state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.expect("text")
}

async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).attr(name).await.expect("attr")
}

/// Section ids whose source badge is visible, with the badge's data-source and text.
async fn visible_badges(c: &Client) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for b in c.find_all(Locator::Css("section .badge")).await.expect("badges") {
        if b.is_displayed().await.expect("displayed") {
            let section: Value = c
                .execute("return arguments[0].closest('section').id;", vec![serde_json::to_value(&b).expect("element")])
                .await
                .expect("script");
            out.push((
                section.as_str().unwrap_or("").to_owned(),
                b.attr("data-source").await.expect("attr").unwrap_or_default(),
                b.text().await.expect("text"),
            ));
        }
    }
    out
}

/// `complete up to HH:MM:SS, <number> s ago` (the regex `complete up to \d\d:\d\d:\d\d, [\d.]+ s ago`).
fn is_freshness_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("complete up to ") else {
        return false;
    };
    let b = rest.as_bytes();
    let clock =
        b.len() > 8 && [0, 1, 3, 4, 6, 7].iter().all(|&i| b[i].is_ascii_digit()) && b[2] == b':' && b[5] == b':';
    let Some(ago) = rest.get(8..).and_then(|r| r.strip_prefix(", ")) else {
        return false;
    };
    let number: String = ago.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    clock && !number.is_empty() && ago[number.len()..].starts_with(" s ago")
}

/// The values the by-day chart must carry for `field` over the 7-day range.
fn day_values(k: &Known, on_day: u64) -> String {
    k.days7.iter().map(|d| if *d == k.day { on_day } else { 0 }).map(|n| n.to_string()).collect::<Vec<_>>().join(",")
}

/// Pixels of a PNG screenshot (RGB or RGBA, 8 bits), row-major.
struct Shot {
    width: usize,
    height: usize,
    channels: usize,
    data: Vec<u8>,
}

impl Shot {
    fn decode(png_bytes: &[u8]) -> Self {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().expect("png header");
        let mut data = vec![0; reader.output_buffer_size().expect("png size")];
        let info = reader.next_frame(&mut data).expect("png frame");
        data.truncate(info.buffer_size());
        Shot { width: info.width as usize, height: info.height as usize, channels: info.color_type.samples(), data }
    }

    /// Pixels in the device-pixel rectangle whose colour is within `tol` of `rgb` per channel.
    fn count(&self, rect: (usize, usize, usize, usize), rgb: [u8; 3], tol: u8) -> usize {
        let (x0, y0, w, h) = rect;
        let mut n = 0;
        for y in y0..(y0 + h).min(self.height) {
            for x in x0..(x0 + w).min(self.width) {
                let i = (y * self.width + x) * self.channels;
                if (0..3).all(|c| self.data[i + c].abs_diff(rgb[c]) <= tol) {
                    n += 1;
                }
            }
        }
        n
    }
}

/// Scrolls `css` into view, takes a screenshot and returns it with the element's rectangle in
/// device pixels of that screenshot.
async fn shoot(c: &Client, css: &str) -> (Vec<u8>, Shot, (usize, usize, usize, usize)) {
    let e = c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    let view: Value = c
        .execute(
            "arguments[0].scrollIntoView({block: 'center'});
             return [window.scrollX, window.scrollY, window.devicePixelRatio, window.innerWidth];",
            vec![serde_json::to_value(&e).expect("element")],
        )
        .await
        .expect("scroll");
    let f = |i: usize| view[i].as_f64().expect("number");
    let (scroll_x, scroll_y, dpr, inner_width) = (f(0), f(1), f(2), f(3));
    // The element rectangle is in CSS pixels of the document; the screenshot is the viewport.
    let (x, y, w, h) = e.rectangle().await.expect("rectangle");
    let png_bytes = c.screenshot().await.expect("screenshot");
    let shot = Shot::decode(&png_bytes);
    assert!(
        (shot.width as f64 - inner_width * dpr).abs() <= dpr * 20.0,
        "screenshot {}px wide, viewport {inner_width} CSS px at ratio {dpr}",
        shot.width
    );
    let px = |v: f64| (v * dpr).round().max(0.0) as usize;
    let rect = (px(x - scroll_x), px(y - scroll_y), px(w), px(h));
    assert!(
        rect.0 + rect.2 <= shot.width + 2 && rect.1 + rect.3 <= shot.height + 2,
        "{css} ({rect:?}) is not inside the {}x{} screenshot",
        shot.width,
        shot.height
    );
    (png_bytes, shot, rect)
}

fn save(dir: &TestDir, name: &str, png_bytes: &[u8]) {
    std::fs::write(dir.join(name), png_bytes).expect("saving screenshot");
    // The test directory is removed after a passing run; keep the latest copy for people.
    let keep = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("eventflow-{name}"));
    let _ = std::fs::write(keep, png_bytes);
}

// Chart colours (dashboard.html).
const VISITS: [u8; 3] = [0x25, 0x63, 0xeb];
const SESSIONS: [u8; 3] = [0x16, 0xa3, 0x4a];
const ENTRIES: [u8; 3] = [0xdc, 0x26, 0x26];
const LIVE: [u8; 3] = [0x93, 0x33, 0xea];

/// A person with acme's token sees exactly the numbers that were sent, charts with data and
/// the freshness line; no section is marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_exact_numbers_charts_and_freshness() {
    let p = start_pipeline("dashboard", "").await;
    let k = send_known_facts(&p).await;
    // Three clicks on a tracked link, written by the collector's next click flush (5 s).
    crate::collector::import_links(&p.d, &p.dir, "links.csv", "spring,acme,https://site.test/event/spring,,,,,\n");
    for _ in 0..3 {
        assert_eq!(crate::collector::click(&p.d.collector_url(), "spring", None).await.0, 302);
    }
    let link_clicks = format!("{}/v1/clients/acme/statistics/overview", p.d.api_url());
    eventually(Duration::from_secs(30), "the clicks written", || async {
        get_json(&link_clicks, Some(ACME_TOKEN)).await.1["link_clicks"]
            == serde_json::json!([{"cid": "spring", "clicks": 3}])
    })
    .await;
    let b = Browser::start(&p.dir).await;
    let c = &b.client;
    assert_eq!(open(&b, &p.d.api_url(), "acme", ACME_TOKEN).await, "ready");

    // Headline numbers (worked out by hand in send_known_facts).
    for (metric, shown) in [
        ("visits", "6"),
        ("unique_sessions", "4"),
        ("entries", "3"),
        ("linked_entries", "2"),
        ("conversion_rate", "75.0%"),
    ] {
        assert_eq!(text(c, &format!("#totals [data-metric={metric}] .value")).await, shown, "{metric}");
    }
    for (metric, shown) in [("landing", "3"), ("webinar", "2"), ("live", "1")] {
        assert_eq!(text(c, &format!("#by-page [data-metric={metric}] .value")).await, shown, "{metric}");
    }
    for (metric, shown) in
        [("session_link_rate", "66.7%"), ("utm_missing_ratio", "66.7%"), ("unresolved_cid_ratio", "100.0%")]
    {
        assert_eq!(text(c, &format!("#quality [data-metric={metric}] .value")).await, shown, "{metric}");
    }
    let rows = c.find_all(Locator::Css("#campaigns tbody tr")).await.unwrap();
    let mut table = Vec::new();
    for r in rows {
        table.push(r.text().await.unwrap());
    }
    assert_eq!(
        table,
        vec![
            "unresolved unknown unknown unknown 4 3",
            "unresolved ads cpc spring 1 0",
            "unresolved newsletter email fall 1 0"
        ]
    );

    // Clicks per tracked link, with the visits and entries attributed to that cid (none here).
    let rows = c.find_all(Locator::Css("#link-clicks tbody tr")).await.unwrap();
    let mut links = Vec::new();
    for r in rows {
        links.push(r.text().await.unwrap());
    }
    assert_eq!(links, vec!["spring 3 0 0"]);

    // The daily chart: one line per series over the 7 days, a marker per day.
    for (series, on_day) in [("visits", 6), ("unique_sessions", 4), ("entries", 3)] {
        let css = format!("#by-day svg polyline[data-series={series}]");
        assert_eq!(attr(c, &css, "data-values").await.as_deref(), Some(day_values(&k, on_day).as_str()), "{series}");
        let points = attr(c, &css, "points").await.unwrap_or_default();
        assert_eq!(points.split(' ').count(), 7, "{series}: {points}");
    }
    assert_eq!(c.find_all(Locator::Css("#by-day svg circle")).await.unwrap().len(), 21);
    // The live chart of w1: concurrent viewers minute by minute.
    let live = "#live [data-webinar=w1] svg polyline[data-series=concurrent]";
    assert_eq!(attr(c, live, "data-values").await.as_deref(), Some("1,2,3,2,1"));
    assert_eq!(c.find_all(Locator::Css("#live [data-webinar=w1] svg circle")).await.unwrap().len(), 5);
    let heading = text(c, "#live [data-webinar=w1] h3").await;
    assert!(heading.contains("peak 3 at") && heading.contains("9 viewer-minutes"), "{heading}");

    // Freshness, and nothing marked as raw or unavailable.
    let line = text(c, "#freshness-line").await;
    assert!(is_freshness_line(&line), "freshness line: {line:?}");
    assert_eq!(visible_badges(c).await, vec![]);
    let page = text(c, "body").await;
    assert!(!page.contains("from raw facts") && !page.contains("unavailable"), "{page}");

    // The screenshot shows the charts with their coloured strokes.
    let (png_bytes, shot, rect) = shoot(c, "#by-day svg").await;
    save(&p.dir, "dashboard-by-day.png", &png_bytes);
    for (name, rgb) in [("visits", VISITS), ("sessions", SESSIONS), ("entries", ENTRIES)] {
        let n = shot.count(rect, rgb, 40);
        assert!(n >= 40, "daily chart: only {n} {name}-coloured pixels in {rect:?}");
    }
    let (png_bytes, shot, rect) = shoot(c, "#live [data-webinar=w1] svg").await;
    save(&p.dir, "dashboard-live.png", &png_bytes);
    let n = shot.count(rect, LIVE, 40);
    assert!(n >= 200, "live chart: only {n} purple pixels in {rect:?}");

    // The range selector reloads with 30 days.
    c.find(Locator::Css("#range option[value='30d']")).await.unwrap().click().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = wait_state(c).await;
        let values = c
            .execute(
                "const l = document.querySelector('#by-day svg polyline[data-series=visits]');
                 return l ? l.getAttribute('data-values') : '';",
                vec![],
            )
            .await
            .expect("script");
        let n = values.as_str().unwrap_or("").split(',').count();
        if state == "ready" && n == 30 {
            break;
        }
        assert!(Instant::now() < deadline, "no 30-day chart: {state} {values}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(text(c, "#totals [data-metric=visits] .value").await, "6");
    b.close().await;
}

/// Wrong and foreign tokens give a readable message; a section served from raw facts (its
/// aggregate deleted in ClickHouse) carries the badge, and only that section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_auth_errors_and_raw_badges() {
    let p = start_pipeline("dashboard-raw", "").await;
    send_known_facts(&p).await;
    let b = Browser::start(&p.dir).await;
    let c = &b.client;
    let api = p.d.api_url();

    assert_eq!(open(&b, &api, "acme", "wrong-token-for-tests-0001").await, "error");
    let msg = c.find(Locator::Id("message")).await.unwrap();
    assert!(msg.is_displayed().await.unwrap());
    let msg = msg.text().await.unwrap();
    assert!(msg.contains("401") && msg.contains("token"), "{msg}");
    assert!(c.find_all(Locator::Css("#totals .card")).await.unwrap().is_empty());

    assert_eq!(open(&b, &api, "acme", GLOBEX_TOKEN).await, "error");
    let msg = text(c, "#message").await;
    assert!(msg.contains("403") && msg.contains("acme"), "{msg}");

    // The right token clears the message.
    assert_eq!(open(&b, &api, "acme", ACME_TOKEN).await, "ready");
    assert!(!c.find(Locator::Id("message")).await.unwrap().is_displayed().await.unwrap());
    assert_eq!(visible_badges(c).await, vec![]);

    // Delete acme's campaign aggregate (a mutation on 18.16) and wait until it is gone.
    p.ch().query("ALTER TABLE eventflow.daily_marketing DELETE WHERE client_id = 'acme'").expect("mutation");
    eventually(Duration::from_secs(30), "daily_marketing rows of acme deleted", || async {
        p.ch().number("SELECT count() FROM eventflow.daily_marketing WHERE client_id = 'acme'") == 0
    })
    .await;
    let (status, o) = get_json(&format!("{api}/v1/clients/acme/statistics/overview"), Some(ACME_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(o["meta"]["data_sources"]["campaigns"], "raw", "the API must detect the missing aggregate: {o}");

    assert_eq!(open(&b, &api, "acme", ACME_TOKEN).await, "ready");
    assert_eq!(visible_badges(c).await, vec![("campaigns".to_owned(), "raw".to_owned(), "from raw facts".to_owned())]);
    // Recounted from raw facts, the table is the same.
    let rows = c.find_all(Locator::Css("#campaigns tbody tr")).await.unwrap();
    let mut table = Vec::new();
    for r in rows {
        table.push(r.text().await.unwrap());
    }
    assert_eq!(table.len(), 3, "{table:?}");
    assert_eq!(table[0], "unresolved unknown unknown unknown 4 3");
    let sources = text(c, "#freshness-sources").await;
    assert!(sources.contains("campaigns from raw facts"), "{sources}");
    let (png_bytes, _, _) = shoot(c, "#campaigns").await;
    save(&p.dir, "dashboard-raw.png", &png_bytes);
    b.close().await;
}

/// When the continuous reconcile has confirmed that acme's aggregate differs from the raw
/// recount (`doubt.rs` alters one `daily_totals` row: visits 6 + 1000), the page says so right
/// after the freshness line, naming the day, the figure and both values; after a backfill and a
/// clean reconcile pass the warning is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_warns_next_to_freshness_when_numbers_are_in_doubt() {
    let (p, k, _, _) = crate::doubt::pipeline_with_a_day_in_doubt("dashboard-doubt").await;
    let b = Browser::start(&p.dir).await;
    let c = &b.client;
    let api = p.d.api_url();
    assert_eq!(open(&b, &api, "acme", ACME_TOKEN).await, "ready");

    let warning = c.find(Locator::Id("freshness-doubt")).await.expect("#freshness-doubt");
    assert!(warning.is_displayed().await.unwrap(), "the warning is visible");
    let shown = warning.text().await.unwrap();
    for part in [
        "numbers in doubt".to_owned(),
        k.day.clone(),
        "visits: aggregate 1,006, raw 6".to_owned(),
        "checked".to_owned(),
    ] {
        assert!(shown.contains(&part), "{part:?} missing from the warning {shown:?}");
    }
    // Next to the freshness line: its sibling in the freshness block, on the same row.
    let next: Value = c
        .execute("return document.getElementById('freshness-line').nextElementSibling.id;", vec![])
        .await
        .expect("script");
    assert_eq!(next, "freshness-doubt");
    let (_, line_y, _, line_h) = c.find(Locator::Id("freshness-line")).await.unwrap().rectangle().await.unwrap();
    let (_, warn_y, _, warn_h) = warning.rectangle().await.unwrap();
    assert!(
        warn_y < line_y + line_h && line_y < warn_y + warn_h,
        "the warning ({warn_y}+{warn_h}) is not on the freshness line's row ({line_y}+{line_h})"
    );
    // The totals on the page are the altered aggregate the warning is about.
    assert_eq!(text(c, "#totals [data-metric=visits] .value").await, "1,006");
    let (png_bytes, shot, rect) = shoot(c, "#freshness-doubt").await;
    save(&p.dir, "dashboard-doubt.png", &png_bytes);
    let n = shot.count(rect, DOUBT_BACKGROUND, 6);
    assert!(n >= rect.2 * rect.3 / 3, "the warning is not drawn on its amber background: {n} pixels in {rect:?}");

    let (code, out) = p.d.run(&["backfill", "--from", &k.day, "--to", &k.day, "--client", "acme"]);
    assert_eq!(code, 0, "backfill: {out}");
    crate::doubt::wait_for_no_doubt(&p).await;
    assert_eq!(open(&b, &api, "acme", ACME_TOKEN).await, "ready");
    assert!(!c.find(Locator::Id("freshness-doubt")).await.unwrap().is_displayed().await.unwrap());
    assert_eq!(text(c, "#totals [data-metric=visits] .value").await, "6");
    b.close().await;
}

/// Background of the doubt warning (dashboard.html).
const DOUBT_BACKGROUND: [u8; 3] = [0xfe, 0xf3, 0xc7];

/// The browser harness itself works: Chromium loads a local page and runs its script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_runs_local_pages() {
    let dir = TestDir::new("chromium-smoke");
    let (port, _pages) = serve_pages(
        vec![],
        "<html><body><p id=x>a</p><script>document.getElementById('x').textContent='ran'</script></body></html>".into(),
    )
    .await;
    let b = Browser::start(&dir).await;
    b.client.goto(&format!("http://127.0.0.1:{port}/event/anything")).await.unwrap();
    let text = b.client.find(fantoccini::Locator::Id("x")).await.unwrap().text().await.unwrap();
    assert_eq!(text, "ran");
    b.close().await;
}
