"""Human alignment (docs/vtt.md): visual Turing tests, the study's statistics, and the report.

vtt        blinded rater pages (vtt_page) and the sealed key; reading answers back
scoring    per rater and model: precision, recall, accuracy, FPR, FNR, t test, Diff, exact KS; model means, ranks
collect    one tidy table of every evaluated number across run directories
alignment  rankings, FD-human correlations with bootstrap CIs, extractor agreement (Kendall's W)
stats      the study's generic tests (KS, paired t, independent t, Pearson) over any CSV column
report     Markdown / HTML report with figures, and W&B logging
cli        ``fidmed vtt make|score``, ``fidmed collect``, ``fidmed analyze``, ``fidmed stats``
"""
