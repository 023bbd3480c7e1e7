"""The pruning methods, one module each, registered in one place.

A method is a ``Method`` subclass (``flexigpt.methods.base``): validation, slot views, surgery,
parameter estimate, label and CLI options. To add one, write a module with a subclass and
``register`` an instance; nothing else in the library or the app changes.
"""
from __future__ import annotations

from flexigpt.methods.base import BuildContext, Method, nearest_kept
from flexigpt.methods.drop import Drop
from flexigpt.methods.extend import Extend
from flexigpt.methods.flexigpt import FlexiGPT
from flexigpt.methods.foldgpt import FoldGPT, fold_layout
from flexigpt.methods.registry import get_method, method_names, methods, register, unregister
from flexigpt.methods.replaceme import ReplaceMe
from flexigpt.methods.streamline import Streamline

__all__ = ["BuildContext", "Method", "fold_layout", "get_method", "method_names", "methods", "nearest_kept",
           "register", "unregister"]

for _method in (FlexiGPT(), Drop(), Extend(), FoldGPT(), ReplaceMe(), Streamline()):
    register(_method)
