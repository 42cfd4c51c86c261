// Drives `slotq dashboard` in the system's headless Chromium, as a person would use it:
//   node dashboard.mjs URL PLAIN_QUEUE RELIABLE_QUEUE DEAD_ID SCREENSHOT
// Checks that the page loads with no console error, shows the plain queue's depth changing
// while a producer runs, and that a dead letter replayed from the page leaves the dead
// letters (the caller checks that it is back in the queue). Keeps a screenshot.
// Prints one JSON line of what it saw; exits 1 with the reason on the first failure.
import { chromium } from "playwright-core";

const [url, plain, reliable, deadId, shot] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const seen = { consoleErrors: [], depths: [] };

function fail(why) {
  console.error("browser test failed: " + why);
  console.log(JSON.stringify(seen));
  process.exit(1);
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  // Root in CI: Chromium's sandbox needs a user namespace it may not get there.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  page.on("console", (m) => { if (m.type() === "error") seen.consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => seen.consoleErrors.push(String(e)));
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => document.querySelector("#live")?.textContent === "live", null, { timeout: 15000 })
    .catch(() => fail("the event stream never connected"));
  const depthOf = `[data-queue="${plain}"] [data-testid="depth-total"]`;
  await page.waitForSelector(depthOf, { timeout: 15000 }).catch(() => fail(`queue ${plain} not shown`));
  // The depth must change while the producer runs: up to 15 pictures.
  const first = Number(await page.textContent(depthOf));
  seen.depths.push(first);
  let changed = false;
  for (let i = 0; i < 15 && !changed; i++) {
    await page.waitForTimeout(1000);
    const d = Number(await page.textContent(depthOf));
    seen.depths.push(d);
    changed = d !== first;
  }
  if (!changed) fail(`depth of ${plain} stayed ${first}`);
  const masters = await page.$$eval("[data-master]", (e) => e.length);
  seen.masters = masters;
  if (masters < 1) fail("no master shown");
  const shards = await page.$$eval(`[data-queue="${plain}"] [data-shard]`, (e) => e.length);
  seen.shards = shards;
  if (shards < 1) fail("no shard bars");
  // Rates come from the flow totals the producer writes once a second.
  await page.waitForFunction(
    (q) => {
      const t = document.querySelector(`[data-queue="${q}"] [data-testid="in-rate"]`)?.textContent || "";
      return t !== "–/s" && t !== "0/s" && t !== "";
    },
    plain,
    { timeout: 15000 },
  ).catch(() => fail("no rate of messages in shown"));
  seen.inRate = await page.textContent(`[data-queue="${plain}"] [data-testid="in-rate"]`);

  // The dead letter: shown, replayed from the page, gone from the list.
  const card = `[data-queue="${reliable}"]`;
  await page.click(`${card} [data-testid="show-dead"]`);
  const row = `${card} [data-dead-id="${deadId}"]`;
  await page.waitForSelector(row, { timeout: 10000 }).catch(() => fail(`dead letter ${deadId} not listed`));
  seen.deadReason = (await page.textContent(`${row} td:nth-child(2)`))?.trim();
  await page.screenshot({ path: shot, fullPage: true });
  await page.click(`${row} [data-testid="replay"]`);
  await page.waitForSelector(row, { state: "detached", timeout: 10000 })
    .catch(() => fail("the replayed dead letter is still listed"));
  await page.waitForFunction(
    (sel) => document.querySelector(sel)?.textContent === "0",
    `${card} [data-testid="dead-total"]`,
    { timeout: 10000 },
  ).catch(() => fail("the dead letter count did not drop to 0"));
  if (seen.consoleErrors.length) fail("console errors: " + seen.consoleErrors.join(" | "));
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
