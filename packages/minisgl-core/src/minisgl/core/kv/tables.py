"""The device-resident token table and page table. Row r belongs to one running request:
token_table[r, p] is its token at position p, page_table[r, i] its i-th KV page. Sampled tokens are
written into the token table on the device, and the next step reads its input ids from there, so the
CPU never has to wait for a token before launching the next step."""

from __future__ import annotations

import torch

from minisgl.core.model_runner.transfer import pinned, to_device


class RequestTables:
    def __init__(self, max_rows: int, max_seq_len: int, page_size: int, device: torch.device) -> None:
        self.max_seq_len = max_seq_len
        self.page_size = page_size
        max_pages = -(-max_seq_len // page_size)
        # +1 column: a request that reaches max_seq_len still gets its final sampled token written.
        self.token_table = torch.zeros(max_rows, max_seq_len + 1, dtype=torch.int64, device=device)
        self.page_table = torch.zeros(max_rows, max_pages, dtype=torch.int32, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))
        # Page-table writes are collected on the host and applied in one scatter per step.
        self._pending: tuple[list[int], list[int], list[int]] = ([], [], [])

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def acquire_row(self, prompt_ids: list[int]) -> int:
        row = self._free_rows.pop()
        ids = pinned(prompt_ids, torch.int64)
        self.token_table[row, : len(prompt_ids)].copy_(ids, non_blocking=True)
        return row

    def release_row(self, row: int) -> None:
        assert row not in self._free_rows, f"table row {row} released twice"
        self._free_rows.append(row)

    def set_pages(self, row: int, first_index: int, pages: list[int]) -> None:
        """Record pages [first_index, first_index + len(pages)) of the request in `row` (applied by flush)."""
        rows, columns, values = self._pending
        rows.extend([row] * len(pages))
        columns.extend(range(first_index, first_index + len(pages)))
        values.extend(pages)

    def flush(self) -> None:
        """Apply the recorded page-table writes; the engine calls this before each step."""
        rows, columns, values = self._pending
        if not rows:
            return
        device = self.page_table.device
        rows_dev, columns_dev = to_device(rows, torch.int64, device), to_device(columns, torch.int64, device)
        self.page_table[rows_dev, columns_dev] = to_device(values, torch.int32, device)
        self._pending = ([], [], [])
