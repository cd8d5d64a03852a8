// taskmode console glue: dialogs, confirmations, live row insertion and the monitoring charts.
// Everything else is server-rendered HTML swapped by htmx.
(function () {
  "use strict";

  document.addEventListener("click", function (event) {
    var opener = event.target.closest("[data-open-dialog]");
    if (opener) document.getElementById(opener.dataset.openDialog).showModal();
    var closer = event.target.closest("[data-close-dialog]");
    if (closer) document.getElementById(closer.dataset.closeDialog).close();
  });

  // Plain forms that must be confirmed (e.g. delete a function).
  document.addEventListener("submit", function (event) {
    var message = event.target.dataset && event.target.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });

  // Submit Task succeeded: show the answer on the page and close the dialog.
  document.body.addEventListener("taskSubmitted", function () {
    var dialog = document.getElementById("submit-dialog");
    var result = document.getElementById("submit-result");
    document.getElementById("flash").innerHTML = result.innerHTML;
    result.innerHTML = "";
    dialog.querySelector("form").reset();
    dialog.close();
  });

  // A live row whose task is not on the page yet: the server marks the ones that belong at the
  // top (new tasks matching the filters); htmx reports them as out-of-band swaps without target.
  document.body.addEventListener("htmx:oobErrorNoTarget", function (event) {
    var row = event.detail.content;
    var rows = document.getElementById("task-rows");
    if (!rows || !row || !row.matches || !row.matches("tr[data-insert-top]")) return;
    row.removeAttribute("hx-swap-oob");
    rows.prepend(row);
    htmx.process(row);
    var limit = parseInt(rows.dataset.limit || "0", 10);
    while (limit && rows.rows.length > limit) rows.deleteRow(rows.rows.length - 1);
    var note = document.querySelector(".empty-note");
    if (note) note.hidden = true;
  });

  document.body.addEventListener("htmx:sseOpen", function () {
    document.querySelectorAll(".live-state").forEach(function (el) { el.classList.add("on"); });
  });
  document.body.addEventListener("htmx:sseError", function () {
    document.querySelectorAll(".live-state").forEach(function (el) { el.classList.remove("on"); });
  });

  // Monitoring: one uPlot chart per figure, redrawn from the server's samples every few seconds.
  var PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#d97706", "#7c3aed", "#0891b2"];

  function startCharts(container) {
    var plots = {};
    function draw(data) {
      Object.keys(data.charts).forEach(function (key) {
        var chart = data.charts[key];
        var names = Object.keys(chart.series);
        var columns = [data.t].concat(names.map(function (n) { return chart.series[n]; }));
        var holder = container.querySelector('[data-chart="' + key + '"] .plot');
        if (!holder) return;
        if (!plots[key]) {
          plots[key] = new uPlot({
            width: Math.max(holder.clientWidth, 300), height: 220,
            series: [{}].concat(names.map(function (n, i) {
              return { label: n, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: false };
            })),
            axes: [{}, { size: 60 }],
          }, columns, holder);
        } else {
          plots[key].setData(columns);
        }
      });
      container.dataset.samples = String(data.t.length);
    }
    function refresh() {
      fetch(container.dataset.source, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) { if (data) draw(data); })
        .catch(function () {});
    }
    refresh();
    setInterval(refresh, parseInt(container.dataset.refreshMs || "5000", 10));
  }

  document.addEventListener("DOMContentLoaded", function () {
    var charts = document.getElementById("charts");
    if (charts) startCharts(charts);
  });
})();
