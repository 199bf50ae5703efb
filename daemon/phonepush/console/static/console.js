// Live updates: every few seconds the page is fetched again and each [data-live] section whose
// content changed is swapped in; forms outside them (what someone is typing) are left alone.
"use strict";
(function () {
  const PERIOD_MS = 2000;
  const status = document.getElementById("live");
  if (!document.querySelector("[data-live]")) {
    if (status) status.hidden = true;
    return;
  }

  function show(online) {
    if (!status) return;
    status.classList.toggle("offline", !online);
    status.textContent = online ? "live" : "offline";
  }

  async function refresh() {
    const answer = await fetch(window.location.href, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-Console-Poll": "1" },
    });
    if (answer.redirected) {
      // Signed out meanwhile (or the session expired): let the browser go to the sign-in page.
      window.location.reload();
      return;
    }
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
    for (const section of document.querySelectorAll("[data-live]")) {
      const next = fresh.getElementById(section.id);
      if (next && next.innerHTML !== section.innerHTML) {
        section.replaceWith(document.importNode(next, true));
      }
    }
  }

  async function tick() {
    let wait = PERIOD_MS;
    if (!document.hidden) {
      const started = performance.now();
      try {
        await refresh();
        show(true);
      } catch (error) {
        show(false);
      }
      // A page that is slow to make (a large fleet, a loaded daemon) is asked for less often:
      // the console never costs the daemon more than a tenth of its time.
      wait = Math.max(PERIOD_MS, 10 * (performance.now() - started));
    }
    window.setTimeout(tick, wait);
  }

  window.setTimeout(tick, PERIOD_MS);
})();
