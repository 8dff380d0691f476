//! Browser tests of the tracker (headless Chromium via chromedriver).
