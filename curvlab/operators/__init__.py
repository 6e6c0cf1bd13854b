"""The shared operator interface and the exact matrix-free curvature operators."""

from curvlab.operators.base import CurvatureOperator
from curvlab.operators.exact import GGN, EmpiricalFisher, Fisher, Hessian, ProblemOperator

__all__ = ["GGN", "CurvatureOperator", "EmpiricalFisher", "Fisher", "Hessian", "ProblemOperator"]
