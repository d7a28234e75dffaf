// Click a column header of a sortable table to sort by it; click again to reverse. Numbers sort as numbers,
// empty cells ("-") last.
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = table.querySelectorAll("th");
  headers.forEach(function (th, column) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[column].getAttribute("data-v") || a.cells[column].textContent;
        var y = b.cells[column].getAttribute("data-v") || b.cells[column].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var emptyX = x === "" || x === "-", emptyY = y === "" || y === "-";
        if (emptyX !== emptyY) { return emptyX ? 1 : -1; }
        var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
